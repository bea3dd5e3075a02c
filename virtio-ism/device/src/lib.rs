//! virtio-ism device model.
