//! virtio-net TX and RX chains written by the fuzzer: RX queue at guest address 0, TX queue
//! at 0x400, buffers anywhere in the first 64 KiB (the input is copied to address 0).
#![no_main]

use std::os::unix::io::{FromRawFd, IntoRawFd};
use std::os::unix::net::UnixDatagram;

use kata_like_vmm::devices::virtio::net::device::{RX_QUEUE, TAP_TOKEN, TX_QUEUE};
use kata_like_vmm::devices::virtio::net::{Net, Tap};
use kata_like_vmm::devices::virtio::test_utils::{activate, test_memory, TestQueue};
use kata_like_vmm::devices::virtio::VirtioDevice;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

fuzz_target!(|data: &[u8]| {
    let mem = test_memory();
    let len = data.len().min(0x10000);
    mem.write_slice(&data[..len], GuestAddress(0)).unwrap();
    let (a, peer) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    peer.set_nonblocking(true).unwrap();
    // SAFETY: we own the fd from into_raw_fd.
    let file = unsafe { std::fs::File::from_raw_fd(a.into_raw_fd()) };
    let mut net = Net::new(Tap::from_file(file, false), [2, 0, 0, 0, 0, 1]);
    let rx = TestQueue::new(&mem, 0, 16);
    let tx = TestQueue::new(&mem, 0x400, 16);
    activate(&mut net, &mem, &[&rx, &tx]);
    net.process_queue(TX_QUEUE);
    let frame_len = data.first().map_or(60, |b| usize::from(*b) * 8 + 14);
    let _ = peer.send(&vec![0xab; frame_len]);
    net.process_event(TAP_TOKEN, 1);
    net.process_queue(RX_QUEUE);
    let mut buf = [0u8; 2048];
    while peer.recv(&mut buf).is_ok() {}
});
