//! virtio-blk request parsing and execution on guest-written queues. The input is copied
//! to guest address 0, where the descriptor table (16 entries), avail ring (0x100) and
//! request buffers live: the fuzzer controls every chain, length, address and index.
#![no_main]

use std::sync::OnceLock;

use kata_like_vmm::devices::virtio::block::device::Backing;
use kata_like_vmm::devices::virtio::block::{Block, BlockConfig};
use kata_like_vmm::devices::virtio::test_utils::{activate, test_memory, TestQueue};
use kata_like_vmm::devices::virtio::VirtioDevice;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

fn disk() -> &'static std::fs::File {
    static DISK: OnceLock<std::fs::File> = OnceLock::new();
    DISK.get_or_init(|| {
        let f = tempfile_in_tmp();
        f.set_len(64 * 1024).unwrap();
        f
    })
}

fn tempfile_in_tmp() -> std::fs::File {
    let path = std::env::temp_dir().join(format!("kl-fuzz-blk-{}", std::process::id()));
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    f
}

fuzz_target!(|data: &[u8]| {
    let mem = test_memory();
    let len = data.len().min(0x10000);
    mem.write_slice(&data[..len], GuestAddress(0)).unwrap();
    let queue = TestQueue::new(&mem, 0, 16);
    let backing = Backing::new(disk().try_clone().unwrap(), false).unwrap();
    let mut block = Block::new(BlockConfig { id: "fuzz".into(), read_only: false }, Some(backing));
    activate(&mut block, &mem, &[&queue]);
    block.process_queue(0);
    block.process_queue(0);
});
