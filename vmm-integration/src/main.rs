// SPDX-License-Identifier: Apache-2.0
//! ism-vmm: command line -> VmConfig -> run.

mod bus;
mod layout;

fn main() {}
