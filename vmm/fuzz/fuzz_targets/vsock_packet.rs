//! virtio-vsock packets from the guest (TX queue at 0x400) and the receive path (RX queue at
//! 0): headers, lengths, ops and ports all come from the fuzzer.
#![no_main]

use std::os::unix::net::UnixListener;
use std::sync::OnceLock;

use kata_like_vmm::devices::virtio::test_utils::{activate, test_memory, TestQueue};
use kata_like_vmm::devices::virtio::vsock::device::{RX_QUEUE, TX_QUEUE};
use kata_like_vmm::devices::virtio::vsock::Vsock;
use kata_like_vmm::devices::virtio::VirtioDevice;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

fn socket_dir() -> &'static std::path::Path {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("kl-fuzz-vsock-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let mem = test_memory();
    let len = data.len().min(0x10000);
    mem.write_slice(&data[..len], GuestAddress(0)).unwrap();
    let path = socket_dir().join("v.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let mut vsock = Vsock::new(3, listener, path).unwrap();
    let rx = TestQueue::new(&mem, 0, 16);
    let tx = TestQueue::new(&mem, 0x400, 16);
    let ev = TestQueue::new(&mem, 0x800, 16);
    activate(&mut vsock, &mem, &[&rx, &tx, &ev]);
    vsock.process_queue(TX_QUEUE);
    vsock.process_queue(RX_QUEUE);
});
