// SPDX-License-Identifier: Apache-2.0
//! The C side cannot drift from the Rust side: this test compiles a C program with the
//! driver's uapi headers (guest-driver/linux/include/uapi/linux/virtio_ism.h, the device
//! interface, and virtio_ism_ioctl.h, /dev/ismN) and its status header, runs it, and
//! compares every size, offset, ioctl number and constant it prints with
//! - `ism::uapi` (the Rust mirror of the uapi header), and
//! - `virtio_ism_proto::defs` (the wire protocol's source of truth),
//!
//! and the driver's status-to-errno mapping with `ism::CommandError`.
//! Needs a C compiler (`$CC`, else `cc`).

use std::collections::HashMap;
use std::mem::{offset_of, size_of};
use std::path::PathBuf;
use std::process::Command;

use ism::uapi::*;
use virtio_ism_proto::defs;

const PROGRAM: &str = r#"
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <linux/virtio_ism.h>
#include <linux/virtio_ism_ioctl.h>
#include "virtio_ism_status.h"

/* The device header's wire layout, under the names the Rust side checks. */
#define VIRTIO_ISM_CONFIG_SIZE		sizeof(struct virtio_ism_config)
#define VIRTIO_ISM_CTRL_HDR_SIZE	sizeof(struct virtio_ism_ctrl_hdr)
#define VIRTIO_ISM_ATTACH_REQ_SIZE	sizeof(struct virtio_ism_ctrl_attach)
#define VIRTIO_ISM_AREA_SIZE		sizeof(struct virtio_ism_area)
#define VIRTIO_ISM_ALLOC_REPLY_HDR_SIZE	sizeof(struct virtio_ism_ctrl_alloc_reply)
#define VIRTIO_ISM_ATTACH_REPLY_HDR_SIZE sizeof(struct virtio_ism_ctrl_attach_reply)
#define VIRTIO_ISM_QLIST_REPLY_HDR_SIZE	sizeof(struct virtio_ism_ctrl_query_list_reply)
#define VIRTIO_ISM_QREGION_REPLY_HDR_SIZE sizeof(struct virtio_ism_ctrl_query_region_reply)
#define VIRTIO_ISM_EVENT_SIZE		sizeof(struct virtio_ism_event)
#define VIRTIO_ISM_CFG_GID		offsetof(struct virtio_ism_config, gid)
#define VIRTIO_ISM_CFG_DEVID		offsetof(struct virtio_ism_config, devid)
#define VIRTIO_ISM_CFG_CHUNK_SIZE	offsetof(struct virtio_ism_config, chunk_size)
#define VIRTIO_ISM_CFG_NOTIFY_SIZE	offsetof(struct virtio_ism_config, notify_size)
#define VIRTIO_ISM_EV_OFF_TYPE		offsetof(struct virtio_ism_event, ev_type)
#define VIRTIO_ISM_EV_OFF_OFFSET	offsetof(struct virtio_ism_event, offset)
#define VIRTIO_ISM_EV_OFF_DEVID		offsetof(struct virtio_ism_event, devid)
#define VIRTIO_ISM_EV_OFF_PEERS		offsetof(struct virtio_ism_event, peers)
#define VIRTIO_ISM_EV_OFF_TOKEN		offsetof(struct virtio_ism_event, token)
#define VIRTIO_ISM_QREGION_OFF_NUM	offsetof(struct virtio_ism_ctrl_query_region_reply, num)
#define VIRTIO_ISM_ALLOC_OFF_NUM	offsetof(struct virtio_ism_ctrl_alloc_reply, num)
#define VIRTIO_ISM_GRANT_REQ_SIZE	sizeof(struct virtio_ism_ctrl_grant)
#define VIRTIO_ISM_EVENT_VECTOR_REQ_SIZE sizeof(struct virtio_ism_ctrl_event_vector)
#define VIRTIO_ISM_EVENT_VECTOR_PENDING_REQ_SIZE sizeof(struct virtio_ism_ctrl_event_vector_pending)
#define VIRTIO_ISM_PENDING_OFF_ADDR	offsetof(struct virtio_ism_ctrl_event_vector_pending, pending_addr)
#define VIRTIO_ISM_PENDING_OFF_BIT	offsetof(struct virtio_ism_ctrl_event_vector_pending, pending_bit)

#define V(x) printf("%s %llu\n", #x, (unsigned long long)(x))
#define S(t) printf("sizeof_%s %zu\n", #t, sizeof(struct t))
#define O(t, f) printf("off_%s.%s %zu\n", #t, #f, offsetof(struct t, f))

int main(void)
{
	S(virtio_ism_info); O(virtio_ism_info, gid); O(virtio_ism_info, devid);
	O(virtio_ism_info, chunk_size); O(virtio_ism_info, notify_size);
	O(virtio_ism_info, features); O(virtio_ism_info, shm_size);
	O(virtio_ism_info, nr_regions); O(virtio_ism_info, instance);
	O(virtio_ism_info, flags); O(virtio_ism_info, reserved);
	S(virtio_ism_region); O(virtio_ism_region, token); O(virtio_ism_region, size);
	O(virtio_ism_region, map_offset); O(virtio_ism_region, perm);
	O(virtio_ism_region, flags); O(virtio_ism_region, region_flags);
	O(virtio_ism_region, reserved0); O(virtio_ism_region, reserved);
	S(virtio_ism_grant); O(virtio_ism_grant, token); O(virtio_ism_grant, perms);
	O(virtio_ism_grant, peer_devid); O(virtio_ism_grant, flags);
	O(virtio_ism_grant, reserved0); O(virtio_ism_grant, reserved);
	S(virtio_ism_token_op); O(virtio_ism_token_op, token); O(virtio_ism_token_op, flags);
	O(virtio_ism_token_op, reserved0); O(virtio_ism_token_op, reserved);
	S(virtio_ism_region_area); O(virtio_ism_region_area, offset);
	O(virtio_ism_region_area, size);
	S(virtio_ism_region_info); O(virtio_ism_region_info, token);
	O(virtio_ism_region_info, size); O(virtio_ism_region_info, map_offset);
	O(virtio_ism_region_info, areas); O(virtio_ism_region_info, max_areas);
	O(virtio_ism_region_info, nr_areas); O(virtio_ism_region_info, flags);
	O(virtio_ism_region_info, region_flags); O(virtio_ism_region_info, kicks);
	O(virtio_ism_region_info, reserved);
	S(virtio_ism_list); O(virtio_ism_list, tokens); O(virtio_ism_list, max_tokens);
	O(virtio_ism_list, nr_tokens); O(virtio_ism_list, flags);
	O(virtio_ism_list, reserved0); O(virtio_ism_list, reserved);
	S(virtio_ism_event_record); O(virtio_ism_event_record, type);
	O(virtio_ism_event_record, token); O(virtio_ism_event_record, devid);
	O(virtio_ism_event_record, peers);

	V(VIRTIO_ISM_IOC_INFO); V(VIRTIO_ISM_IOC_ALLOC); V(VIRTIO_ISM_IOC_ATTACH);
	V(VIRTIO_ISM_IOC_DETACH); V(VIRTIO_ISM_IOC_GRANT); V(VIRTIO_ISM_IOC_BIND);
	V(VIRTIO_ISM_IOC_UNBIND); V(VIRTIO_ISM_IOC_KICK); V(VIRTIO_ISM_IOC_REGION_INFO);
	V(VIRTIO_ISM_IOC_LIST); V(VIRTIO_ISM_IOC_KEEP);

	V(VIRTIO_ISM_PERM_READ); V(VIRTIO_ISM_PERM_WRITE); V(VIRTIO_ISM_PERM_ATTACH);
	V(VIRTIO_ISM_PERM_MANAGE); V(VIRTIO_ISM_PERM_CLEAN_DEFAULT);
	V(VIRTIO_ISM_REGION_F_WRITE); V(VIRTIO_ISM_REGION_F_OWNER); V(VIRTIO_ISM_REGION_F_BOUND);
	V(VIRTIO_ISM_REGION_F_KEPT); V(VIRTIO_ISM_REGION_F_MINE);
	V(VIRTIO_ISM_REGION_F_HOTPLUGGED); V(VIRTIO_ISM_REGION_F_OWN_VECTOR);
	V(VIRTIO_ISM_INFO_F_EVENT_QUEUE); V(VIRTIO_ISM_INFO_F_QUERY); V(VIRTIO_ISM_INFO_F_GRANT);
	V(VIRTIO_ISM_INFO_KICK_VECTORS); V(VIRTIO_ISM_INFO_KICK_PENDING);
	V(VIRTIO_ISM_INFO_F_KICK_PENDING);
	V(VIRTIO_ISM_EV_UPDATE); V(VIRTIO_ISM_EV_ATTACH); V(VIRTIO_ISM_EV_DETACH);
	V(VIRTIO_ISM_EV_REVOKE); V(VIRTIO_ISM_EV_REGION_ADDED); V(VIRTIO_ISM_EV_OVERFLOW);
	V(VIRTIO_ISM_EV_KICK); V(VIRTIO_ISM_EV_LOST);

	/* linux/virtio_ism.h */
	V(VIRTIO_ID_ISM);
	V(VIRTIO_ISM_F_EVENT_IRQ); V(VIRTIO_ISM_F_EVENT_QUEUE); V(VIRTIO_ISM_F_QUERY);
	V(VIRTIO_ISM_F_GRANT); V(VIRTIO_ISM_F_VECTOR_EVENTS); V(VIRTIO_ISM_F_KICK_PENDING);
	V(VIRTIO_ISM_F_EAGAIN);
	V(VIRTIO_ISM_CTRL_QUEUE); V(VIRTIO_ISM_EVENT_QUEUE);
	V(VIRTIO_ISM_SHM_ID_REGIONS); V(VIRTIO_ISM_SHM_ID_NOTIFY);
	V(VIRTIO_ISM_CTRL_ALLOC); V(VIRTIO_ISM_CTRL_ALLOC_REGION);
	V(VIRTIO_ISM_CTRL_ATTACH); V(VIRTIO_ISM_CTRL_ATTACH_REGION);
	V(VIRTIO_ISM_CTRL_DETACH); V(VIRTIO_ISM_CTRL_DETACH_REGION);
	V(VIRTIO_ISM_CTRL_GRANT); V(VIRTIO_ISM_CTRL_GRANT_SET_DEFAULT);
	V(VIRTIO_ISM_CTRL_GRANT_SET_FOR_DEVICE);
	V(VIRTIO_ISM_CTRL_EVENT_VECTOR); V(VIRTIO_ISM_CTRL_EVENT_VECTOR_SET);
	V(VIRTIO_ISM_CTRL_EVENT_VECTOR_PENDING_SET);
	V(VIRTIO_ISM_EVENT_VECTOR_PENDING_REQ_SIZE);
	V(VIRTIO_ISM_PENDING_OFF_ADDR); V(VIRTIO_ISM_PENDING_OFF_BIT);
	V(VIRTIO_ISM_CTRL_QUERY); V(VIRTIO_ISM_CTRL_QUERY_LIST); V(VIRTIO_ISM_CTRL_QUERY_REGION);
	V(VIRTIO_ISM_OK); V(VIRTIO_ISM_ENOENT); V(VIRTIO_ISM_E2BIG); V(VIRTIO_ISM_ENOMEM);
	V(VIRTIO_ISM_ENOSPC); V(VIRTIO_ISM_EAGAIN); V(VIRTIO_ISM_PERM_EATTACH); V(VIRTIO_ISM_PERM_EREAD);
	V(VIRTIO_ISM_PERM_EWRITE); V(VIRTIO_ISM_ERR);
	V(VIRTIO_ISM_EVENT_UPDATE); V(VIRTIO_ISM_EVENT_ATTACH); V(VIRTIO_ISM_EVENT_DETACH);
	V(VIRTIO_ISM_EVENT_REVOKE); V(VIRTIO_ISM_EVENT_REGION_ADDED);
	V(VIRTIO_ISM_EVENT_OVERFLOW);
	V(VIRTIO_ISM_QREGION_READ); V(VIRTIO_ISM_QREGION_WRITE); V(VIRTIO_ISM_QREGION_OWNER);
	V(VIRTIO_ISM_QREGION_HOTPLUGGED); V(VIRTIO_ISM_MSI_NO_VECTOR);
	V(VIRTIO_ISM_CONFIG_SIZE); V(VIRTIO_ISM_CTRL_HDR_SIZE); V(VIRTIO_ISM_ATTACH_REQ_SIZE);
	V(VIRTIO_ISM_AREA_SIZE); V(VIRTIO_ISM_ALLOC_REPLY_HDR_SIZE);
	V(VIRTIO_ISM_ATTACH_REPLY_HDR_SIZE); V(VIRTIO_ISM_QLIST_REPLY_HDR_SIZE);
	V(VIRTIO_ISM_QREGION_REPLY_HDR_SIZE); V(VIRTIO_ISM_EVENT_SIZE);
	V(VIRTIO_ISM_CFG_GID); V(VIRTIO_ISM_CFG_DEVID); V(VIRTIO_ISM_CFG_CHUNK_SIZE);
	V(VIRTIO_ISM_CFG_NOTIFY_SIZE);
	V(VIRTIO_ISM_EV_OFF_TYPE); V(VIRTIO_ISM_EV_OFF_OFFSET); V(VIRTIO_ISM_EV_OFF_DEVID);
	V(VIRTIO_ISM_EV_OFF_PEERS); V(VIRTIO_ISM_EV_OFF_TOKEN);
	V(VIRTIO_ISM_QREGION_OFF_NUM); V(VIRTIO_ISM_ALLOC_OFF_NUM);
	V(VIRTIO_ISM_GRANT_REQ_SIZE); V(VIRTIO_ISM_EVENT_VECTOR_REQ_SIZE);

	for (int s = 0; s < 256; s++)
		printf("errno_of_status_%d %d\n", s, -virtio_ism_status_errno((unsigned char)s));
	return 0;
}
"#;

/// PROGRAM's NAME -> value lines, compiled and run once for all tests.
fn c_values() -> HashMap<String, i128> {
    static VALUES: std::sync::OnceLock<HashMap<String, i128>> = std::sync::OnceLock::new();
    VALUES.get_or_init(compile_and_run).clone()
}

fn compile_and_run() -> HashMap<String, i128> {
    let linux = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../linux");
    let dir = std::env::temp_dir().join(format!("ism-c-layout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("layout.c");
    let exe = dir.join("layout");
    std::fs::write(&src, PROGRAM).unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let out = Command::new(&cc)
        .args(["-std=gnu11", "-Wall", "-Werror", "-o"])
        .arg(&exe)
        .arg("-I")
        .arg(&linux)
        .arg("-I")
        .arg(linux.join("include/uapi"))
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {cc}: {e}"));
    assert!(
        out.status.success(),
        "C compile failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    assert!(run.status.success());
    std::fs::remove_dir_all(&dir).unwrap();
    String::from_utf8(run.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(' ').unwrap();
            (k.to_owned(), v.parse().unwrap())
        })
        .collect()
}

struct Checker {
    c: HashMap<String, i128>,
    mismatches: Vec<String>,
    checked: usize,
}

impl Checker {
    fn eq(&mut self, name: &str, rust: i128) {
        self.checked += 1;
        match self.c.get(name) {
            Some(&c) if c == rust => {}
            Some(&c) => self.mismatches.push(format!("{name}: C {c}, Rust {rust}")),
            None => self.mismatches.push(format!("{name}: not printed by C")),
        }
    }
}

macro_rules! check_struct {
    ($k:expr, $t:ident { $($f:ident),+ }) => {{
        $k.eq(concat!("sizeof_", stringify!($t)), size_of::<$t>() as i128);
        $( $k.eq(concat!("off_", stringify!($t), ".", stringify!($f)), offset_of!($t, $f) as i128); )+
    }};
}

macro_rules! check_consts {
    ($k:expr, $($path:path as $name:ident),+ $(,)?) => {{
        $( $k.eq(stringify!($name), $path as i128); )+
    }};
}

#[test]
fn test_uapi_header_matches_rust_and_wire_header_matches_proto() {
    let mut k = Checker {
        c: c_values(),
        mismatches: Vec::new(),
        checked: 0,
    };

    check_struct!(
        k,
        virtio_ism_info {
            gid,
            devid,
            chunk_size,
            notify_size,
            features,
            shm_size,
            nr_regions,
            instance,
            flags,
            reserved
        }
    );
    check_struct!(
        k,
        virtio_ism_region {
            token,
            size,
            map_offset,
            perm,
            flags,
            region_flags,
            reserved0,
            reserved
        }
    );
    check_struct!(
        k,
        virtio_ism_grant {
            token,
            perms,
            peer_devid,
            flags,
            reserved0,
            reserved
        }
    );
    check_struct!(
        k,
        virtio_ism_token_op {
            token,
            flags,
            reserved0,
            reserved
        }
    );
    check_struct!(k, virtio_ism_region_area { offset, size });
    check_struct!(
        k,
        virtio_ism_region_info {
            token,
            size,
            map_offset,
            areas,
            max_areas,
            nr_areas,
            flags,
            region_flags,
            kicks,
            reserved
        }
    );
    check_struct!(
        k,
        virtio_ism_list {
            tokens,
            max_tokens,
            nr_tokens,
            flags,
            reserved0,
            reserved
        }
    );
    k.eq(
        "sizeof_virtio_ism_event_record",
        size_of::<virtio_ism_event_record>() as i128,
    );
    k.eq(
        "off_virtio_ism_event_record.type",
        offset_of!(virtio_ism_event_record, r#type) as i128,
    );
    k.eq(
        "off_virtio_ism_event_record.token",
        offset_of!(virtio_ism_event_record, token) as i128,
    );
    k.eq(
        "off_virtio_ism_event_record.devid",
        offset_of!(virtio_ism_event_record, devid) as i128,
    );
    k.eq(
        "off_virtio_ism_event_record.peers",
        offset_of!(virtio_ism_event_record, peers) as i128,
    );

    check_consts!(
        k,
        VIRTIO_ISM_IOC_INFO as VIRTIO_ISM_IOC_INFO,
        VIRTIO_ISM_IOC_ALLOC as VIRTIO_ISM_IOC_ALLOC,
        VIRTIO_ISM_IOC_ATTACH as VIRTIO_ISM_IOC_ATTACH,
        VIRTIO_ISM_IOC_DETACH as VIRTIO_ISM_IOC_DETACH,
        VIRTIO_ISM_IOC_GRANT as VIRTIO_ISM_IOC_GRANT,
        VIRTIO_ISM_IOC_BIND as VIRTIO_ISM_IOC_BIND,
        VIRTIO_ISM_IOC_UNBIND as VIRTIO_ISM_IOC_UNBIND,
        VIRTIO_ISM_IOC_KICK as VIRTIO_ISM_IOC_KICK,
        VIRTIO_ISM_IOC_REGION_INFO as VIRTIO_ISM_IOC_REGION_INFO,
        VIRTIO_ISM_IOC_LIST as VIRTIO_ISM_IOC_LIST,
        VIRTIO_ISM_IOC_KEEP as VIRTIO_ISM_IOC_KEEP,
        VIRTIO_ISM_PERM_READ as VIRTIO_ISM_PERM_READ,
        VIRTIO_ISM_PERM_WRITE as VIRTIO_ISM_PERM_WRITE,
        VIRTIO_ISM_PERM_ATTACH as VIRTIO_ISM_PERM_ATTACH,
        VIRTIO_ISM_PERM_MANAGE as VIRTIO_ISM_PERM_MANAGE,
        VIRTIO_ISM_PERM_CLEAN_DEFAULT as VIRTIO_ISM_PERM_CLEAN_DEFAULT,
        VIRTIO_ISM_REGION_F_WRITE as VIRTIO_ISM_REGION_F_WRITE,
        VIRTIO_ISM_REGION_F_OWNER as VIRTIO_ISM_REGION_F_OWNER,
        VIRTIO_ISM_REGION_F_BOUND as VIRTIO_ISM_REGION_F_BOUND,
        VIRTIO_ISM_REGION_F_KEPT as VIRTIO_ISM_REGION_F_KEPT,
        VIRTIO_ISM_REGION_F_MINE as VIRTIO_ISM_REGION_F_MINE,
        VIRTIO_ISM_REGION_F_HOTPLUGGED as VIRTIO_ISM_REGION_F_HOTPLUGGED,
        VIRTIO_ISM_REGION_F_OWN_VECTOR as VIRTIO_ISM_REGION_F_OWN_VECTOR,
        VIRTIO_ISM_INFO_F_EVENT_QUEUE as VIRTIO_ISM_INFO_F_EVENT_QUEUE,
        VIRTIO_ISM_INFO_F_QUERY as VIRTIO_ISM_INFO_F_QUERY,
        VIRTIO_ISM_INFO_F_GRANT as VIRTIO_ISM_INFO_F_GRANT,
        VIRTIO_ISM_INFO_KICK_VECTORS as VIRTIO_ISM_INFO_KICK_VECTORS,
        VIRTIO_ISM_INFO_KICK_PENDING as VIRTIO_ISM_INFO_KICK_PENDING,
        VIRTIO_ISM_EV_UPDATE as VIRTIO_ISM_EV_UPDATE,
        VIRTIO_ISM_EV_ATTACH as VIRTIO_ISM_EV_ATTACH,
        VIRTIO_ISM_EV_DETACH as VIRTIO_ISM_EV_DETACH,
        VIRTIO_ISM_EV_REVOKE as VIRTIO_ISM_EV_REVOKE,
        VIRTIO_ISM_EV_REGION_ADDED as VIRTIO_ISM_EV_REGION_ADDED,
        VIRTIO_ISM_EV_OVERFLOW as VIRTIO_ISM_EV_OVERFLOW,
        VIRTIO_ISM_EV_KICK as VIRTIO_ISM_EV_KICK,
        VIRTIO_ISM_EV_LOST as VIRTIO_ISM_EV_LOST,
    );

    // The uapi values that the device protocol also defines must agree with it.
    check_consts!(
        k,
        defs::perm::VIRTIO_ISM_PERM_READ as VIRTIO_ISM_PERM_READ,
        defs::perm::VIRTIO_ISM_PERM_WRITE as VIRTIO_ISM_PERM_WRITE,
        defs::perm::VIRTIO_ISM_PERM_ATTACH as VIRTIO_ISM_PERM_ATTACH,
        defs::perm::VIRTIO_ISM_PERM_MANAGE as VIRTIO_ISM_PERM_MANAGE,
        defs::perm::VIRTIO_ISM_PERM_CLEAN_DEFAULT as VIRTIO_ISM_PERM_CLEAN_DEFAULT,
        defs::event::VIRTIO_ISM_EVENT_UPDATE as VIRTIO_ISM_EV_UPDATE,
        defs::event::VIRTIO_ISM_EVENT_ATTACH as VIRTIO_ISM_EV_ATTACH,
        defs::event::VIRTIO_ISM_EVENT_DETACH as VIRTIO_ISM_EV_DETACH,
        defs::event::VIRTIO_ISM_EVENT_REVOKE as VIRTIO_ISM_EV_REVOKE,
        defs::event::VIRTIO_ISM_EVENT_REGION_ADDED as VIRTIO_ISM_EV_REGION_ADDED,
        defs::event::VIRTIO_ISM_EVENT_OVERFLOW as VIRTIO_ISM_EV_OVERFLOW,
    );
    k.eq(
        "VIRTIO_ISM_INFO_F_EVENT_QUEUE",
        1 << defs::features::VIRTIO_ISM_F_EVENT_QUEUE,
    );
    k.eq(
        "VIRTIO_ISM_INFO_F_QUERY",
        1 << defs::features::VIRTIO_ISM_F_QUERY,
    );
    // The permissions extension and vector events.
    k.eq(
        "VIRTIO_ISM_F_GRANT",
        defs::features::VIRTIO_ISM_F_GRANT.into(),
    );
    k.eq(
        "VIRTIO_ISM_F_VECTOR_EVENTS",
        defs::features::VIRTIO_ISM_F_VECTOR_EVENTS.into(),
    );
    k.eq(
        "VIRTIO_ISM_INFO_F_GRANT",
        1 << defs::features::VIRTIO_ISM_F_GRANT,
    );
    // Pending bits on a shared vector.
    k.eq(
        "VIRTIO_ISM_F_KICK_PENDING",
        defs::features::VIRTIO_ISM_F_KICK_PENDING.into(),
    );
    k.eq(
        "VIRTIO_ISM_F_EAGAIN",
        defs::features::VIRTIO_ISM_F_EAGAIN.into(),
    );
    k.eq(
        "VIRTIO_ISM_INFO_F_KICK_PENDING",
        1 << defs::features::VIRTIO_ISM_F_KICK_PENDING,
    );
    k.eq(
        "VIRTIO_ISM_CTRL_EVENT_VECTOR_PENDING_SET",
        defs::ctrl::VIRTIO_ISM_CTRL_EVENT_VECTOR_PENDING_SET.into(),
    );
    k.eq(
        "VIRTIO_ISM_EVENT_VECTOR_PENDING_REQ_SIZE",
        virtio_ism_proto::EventVectorPendingRequest::SIZE as i128,
    );
    k.eq(
        "VIRTIO_ISM_PENDING_OFF_ADDR",
        virtio_ism_proto::EventVectorPendingRequest::pending_addr as i128,
    );
    k.eq(
        "VIRTIO_ISM_PENDING_OFF_BIT",
        virtio_ism_proto::EventVectorPendingRequest::pending_bit as i128,
    );

    // The wire header against the protocol crate.
    use virtio_ism_proto::ctrl as wire;
    use virtio_ism_proto::{
        AllocReplyHeader, Area, AttachReplyHeader, AttachRequest, ConfigSpace, CtrlHeader, Event,
        QueryListReplyHeader, QueryRegionReplyHeader, WireStruct,
    };
    let _ = wire::REPLY_OFFSET;
    check_consts!(
        k,
        defs::VIRTIO_ID_ISM as VIRTIO_ID_ISM,
        defs::features::VIRTIO_ISM_F_EVENT_IRQ as VIRTIO_ISM_F_EVENT_IRQ,
        defs::features::VIRTIO_ISM_F_EVENT_QUEUE as VIRTIO_ISM_F_EVENT_QUEUE,
        defs::features::VIRTIO_ISM_F_QUERY as VIRTIO_ISM_F_QUERY,
        defs::queues::CTRL_QUEUE_INDEX as VIRTIO_ISM_CTRL_QUEUE,
        defs::queues::EVENT_QUEUE_INDEX as VIRTIO_ISM_EVENT_QUEUE,
        defs::shm::VIRTIO_ISM_SHM_ID_REGIONS as VIRTIO_ISM_SHM_ID_REGIONS,
        defs::shm::VIRTIO_ISM_SHM_ID_NOTIFY as VIRTIO_ISM_SHM_ID_NOTIFY,
        defs::ctrl::VIRTIO_ISM_CTRL_ALLOC as VIRTIO_ISM_CTRL_ALLOC,
        defs::ctrl::VIRTIO_ISM_CTRL_ALLOC_REGION as VIRTIO_ISM_CTRL_ALLOC_REGION,
        defs::ctrl::VIRTIO_ISM_CTRL_ATTACH as VIRTIO_ISM_CTRL_ATTACH,
        defs::ctrl::VIRTIO_ISM_CTRL_ATTACH_REGION as VIRTIO_ISM_CTRL_ATTACH_REGION,
        defs::ctrl::VIRTIO_ISM_CTRL_DETACH as VIRTIO_ISM_CTRL_DETACH,
        defs::ctrl::VIRTIO_ISM_CTRL_DETACH_REGION as VIRTIO_ISM_CTRL_DETACH_REGION,
        defs::ctrl::VIRTIO_ISM_CTRL_GRANT as VIRTIO_ISM_CTRL_GRANT,
        defs::ctrl::VIRTIO_ISM_CTRL_GRANT_SET_DEFAULT as VIRTIO_ISM_CTRL_GRANT_SET_DEFAULT,
        defs::ctrl::VIRTIO_ISM_CTRL_GRANT_SET_FOR_DEVICE as VIRTIO_ISM_CTRL_GRANT_SET_FOR_DEVICE,
        defs::ctrl::VIRTIO_ISM_CTRL_EVENT_VECTOR as VIRTIO_ISM_CTRL_EVENT_VECTOR,
        defs::ctrl::VIRTIO_ISM_CTRL_EVENT_VECTOR_SET as VIRTIO_ISM_CTRL_EVENT_VECTOR_SET,
        defs::ctrl::VIRTIO_ISM_CTRL_QUERY as VIRTIO_ISM_CTRL_QUERY,
        defs::ctrl::VIRTIO_ISM_CTRL_QUERY_LIST as VIRTIO_ISM_CTRL_QUERY_LIST,
        defs::ctrl::VIRTIO_ISM_CTRL_QUERY_REGION as VIRTIO_ISM_CTRL_QUERY_REGION,
        defs::status::VIRTIO_ISM_OK as VIRTIO_ISM_OK,
        defs::status::VIRTIO_ISM_ENOENT as VIRTIO_ISM_ENOENT,
        defs::status::VIRTIO_ISM_E2BIG as VIRTIO_ISM_E2BIG,
        defs::status::VIRTIO_ISM_ENOMEM as VIRTIO_ISM_ENOMEM,
        defs::status::VIRTIO_ISM_ENOSPC as VIRTIO_ISM_ENOSPC,
        defs::status::VIRTIO_ISM_EAGAIN as VIRTIO_ISM_EAGAIN,
        defs::status::VIRTIO_ISM_PERM_EATTACH as VIRTIO_ISM_PERM_EATTACH,
        defs::status::VIRTIO_ISM_PERM_EREAD as VIRTIO_ISM_PERM_EREAD,
        defs::status::VIRTIO_ISM_PERM_EWRITE as VIRTIO_ISM_PERM_EWRITE,
        defs::status::VIRTIO_ISM_ERR as VIRTIO_ISM_ERR,
        defs::event::VIRTIO_ISM_EVENT_UPDATE as VIRTIO_ISM_EVENT_UPDATE,
        defs::event::VIRTIO_ISM_EVENT_ATTACH as VIRTIO_ISM_EVENT_ATTACH,
        defs::event::VIRTIO_ISM_EVENT_DETACH as VIRTIO_ISM_EVENT_DETACH,
        defs::event::VIRTIO_ISM_EVENT_REVOKE as VIRTIO_ISM_EVENT_REVOKE,
        defs::event::VIRTIO_ISM_EVENT_REGION_ADDED as VIRTIO_ISM_EVENT_REGION_ADDED,
        defs::event::VIRTIO_ISM_EVENT_OVERFLOW as VIRTIO_ISM_EVENT_OVERFLOW,
        defs::region_flags::VIRTIO_ISM_REGION_READ as VIRTIO_ISM_QREGION_READ,
        defs::region_flags::VIRTIO_ISM_REGION_WRITE as VIRTIO_ISM_QREGION_WRITE,
        defs::region_flags::VIRTIO_ISM_REGION_OWNER as VIRTIO_ISM_QREGION_OWNER,
        defs::region_flags::VIRTIO_ISM_REGION_HOTPLUGGED as VIRTIO_ISM_QREGION_HOTPLUGGED,
        defs::VIRTIO_MSI_NO_VECTOR as VIRTIO_ISM_MSI_NO_VECTOR,
        ConfigSpace::SIZE as VIRTIO_ISM_CONFIG_SIZE,
        CtrlHeader::SIZE as VIRTIO_ISM_CTRL_HDR_SIZE,
        AttachRequest::SIZE as VIRTIO_ISM_ATTACH_REQ_SIZE,
        Area::SIZE as VIRTIO_ISM_AREA_SIZE,
        AllocReplyHeader::SIZE as VIRTIO_ISM_ALLOC_REPLY_HDR_SIZE,
        AttachReplyHeader::SIZE as VIRTIO_ISM_ATTACH_REPLY_HDR_SIZE,
        QueryListReplyHeader::SIZE as VIRTIO_ISM_QLIST_REPLY_HDR_SIZE,
        QueryRegionReplyHeader::SIZE as VIRTIO_ISM_QREGION_REPLY_HDR_SIZE,
        Event::SIZE as VIRTIO_ISM_EVENT_SIZE,
        ConfigSpace::gid as VIRTIO_ISM_CFG_GID,
        ConfigSpace::devid as VIRTIO_ISM_CFG_DEVID,
        ConfigSpace::chunk_size as VIRTIO_ISM_CFG_CHUNK_SIZE,
        ConfigSpace::notify_size as VIRTIO_ISM_CFG_NOTIFY_SIZE,
        Event::ev_type as VIRTIO_ISM_EV_OFF_TYPE,
        Event::offset as VIRTIO_ISM_EV_OFF_OFFSET,
        Event::devid as VIRTIO_ISM_EV_OFF_DEVID,
        Event::peers as VIRTIO_ISM_EV_OFF_PEERS,
        Event::token as VIRTIO_ISM_EV_OFF_TOKEN,
    );
    // The area counts are the headers' last le64 (the driver reads them there).
    check_consts!(
        k,
        QueryRegionReplyHeader::num as VIRTIO_ISM_QREGION_OFF_NUM,
        AllocReplyHeader::num as VIRTIO_ISM_ALLOC_OFF_NUM,
    );
    k.eq(
        "VIRTIO_ISM_QREGION_REPLY_HDR_SIZE",
        QueryRegionReplyHeader::num as i128 + 8,
    );
    k.eq(
        "VIRTIO_ISM_ALLOC_REPLY_HDR_SIZE",
        AllocReplyHeader::num as i128 + 8,
    );
    // GRANT_SET_FOR_DEVICE: token, permissions, peer_devid; EVENT_VECTOR: token, vector.
    k.eq("VIRTIO_ISM_GRANT_REQ_SIZE", 24);
    k.eq("VIRTIO_ISM_EVENT_VECTOR_REQ_SIZE", 16);

    assert!(
        k.mismatches.is_empty(),
        "C and Rust disagree:\n{}",
        k.mismatches.join("\n")
    );
    assert!(k.checked > 150, "only {} values checked", k.checked);
}

#[test]
fn test_driver_errno_maps_back_to_every_device_status() {
    let c = c_values();
    for raw in 0..=255u8 {
        let errno = c[&format!("errno_of_status_{raw}")] as i32;
        let status = virtio_ism_proto::Status::from_raw(raw);
        let back = ism::CommandError::from_errno(errno);
        match status {
            // OK is no error; E2BIG never leaves the driver (it retries); unknown statuses
            // become EPROTO, a device failure.
            virtio_ism_proto::Status::Ok => assert_eq!(errno, 0),
            virtio_ism_proto::Status::TooBig => assert_eq!(errno, libc::E2BIG),
            virtio_ism_proto::Status::Unknown(_) => {
                assert!(
                    matches!(back, ism::CommandError::DeviceFailed),
                    "{raw}: {back:?}"
                )
            }
            known => assert_eq!(back.device_status(), Some(known), "status {raw}"),
        }
    }
}
