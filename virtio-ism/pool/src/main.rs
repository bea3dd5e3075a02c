// SPDX-License-Identifier: Apache-2.0
//! `ism-pool`: the host-wide region pool broker.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("Not built yet")
}
