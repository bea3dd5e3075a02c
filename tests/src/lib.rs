// SPDX-License-Identifier: Apache-2.0
//! Helpers for the integration tests: locate ism-vmm and the test guest, run a VM with a hard
//! timeout, and parse the guest's `ISM-TEST key=value` serial lines.
