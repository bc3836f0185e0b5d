//! Handling queue notifications: pop every available chain, parse, execute, complete.

use std::os::unix::fs::FileExt;

use virtio_queue::desc::split::Descriptor;
use vm_memory::Bytes;

use super::device::{Block, REQUEST_QUEUE};
use super::request::*;
use crate::devices::virtio::queue;
use crate::vstate::memory::GuestMemoryMmap;

impl Block {
    /// Drains the request queue. Malformed requests complete with IOERR; a broken ring
    /// (avail index too far ahead, used ring not writable) marks the device broken.
    pub fn process_requests(&mut self) {
        queue::drain_queue(self, REQUEST_QUEUE, Self::execute_chain);
    }

    /// Runs one chain; returns the number of bytes written into device-writable buffers.
    fn execute_chain(&mut self, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> u32 {
        let request = match Request::parse(descs, mem, self.capacity()) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.invalid_requests += 1;
                tracing::debug!(drive = %self.config.id, error = %e, "invalid virtio-blk request");
                return match status_address(descs, mem) {
                    Some(addr) if mem.write_obj(VIRTIO_BLK_S_IOERR, addr).is_ok() => 1,
                    _ => 0,
                };
            }
        };
        let (status, written) = self.execute(&request, mem);
        if status == VIRTIO_BLK_S_IOERR {
            self.metrics.io_errors += 1;
        }
        // The status address was range-checked while parsing.
        if mem.write_obj(status, request.status_addr).is_err() {
            return written;
        }
        written + 1
    }

    fn execute(&mut self, r: &Request, mem: &GuestMemoryMmap) -> (u8, u32) {
        match r.request_type {
            RequestType::In => {
                self.metrics.read_requests += 1;
                match self.read_into(r, mem) {
                    Ok(()) => {
                        self.metrics.read_bytes += u64::from(r.data_len);
                        (VIRTIO_BLK_S_OK, r.data_len)
                    }
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            RequestType::Out => {
                self.metrics.write_requests += 1;
                match self.write_from(r, mem) {
                    Ok(()) => {
                        self.metrics.write_bytes += u64::from(r.data_len);
                        (VIRTIO_BLK_S_OK, 0)
                    }
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            RequestType::Flush => {
                self.metrics.flush_requests += 1;
                match self.backing.as_ref() {
                    Some(b) if !b.read_only => match b.file.sync_data() {
                        Ok(()) => (VIRTIO_BLK_S_OK, 0),
                        Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                    },
                    _ => (VIRTIO_BLK_S_OK, 0),
                }
            }
            RequestType::GetDeviceId => {
                self.metrics.get_id_requests += 1;
                let mut remaining: &[u8] = &self.serial;
                let mut written = 0u32;
                for (addr, len) in &r.data {
                    let n = (*len as usize).min(remaining.len());
                    if mem.write_slice(&remaining[..n], *addr).is_err() {
                        return (VIRTIO_BLK_S_IOERR, written);
                    }
                    remaining = &remaining[n..];
                    written += n as u32;
                }
                (VIRTIO_BLK_S_OK, written)
            }
            RequestType::Unsupported(_) => {
                self.metrics.unsupported_requests += 1;
                (VIRTIO_BLK_S_UNSUPP, 0)
            }
        }
    }

    fn read_into(&self, r: &Request, mem: &GuestMemoryMmap) -> std::io::Result<()> {
        let backing = self.backing.as_ref().ok_or(std::io::ErrorKind::NotFound)?;
        let mut offset = r.sector << SECTOR_SHIFT;
        let mut buf = Vec::new();
        for (addr, len) in &r.data {
            buf.resize(*len as usize, 0);
            backing.file.read_exact_at(&mut buf, offset)?;
            mem.write_slice(&buf, *addr)
                .map_err(std::io::Error::other)?;
            offset += u64::from(*len);
        }
        Ok(())
    }

    fn write_from(&self, r: &Request, mem: &GuestMemoryMmap) -> std::io::Result<()> {
        let backing = self.backing.as_ref().ok_or(std::io::ErrorKind::NotFound)?;
        if backing.read_only || self.config.read_only {
            return Err(std::io::ErrorKind::PermissionDenied.into());
        }
        let mut offset = r.sector << SECTOR_SHIFT;
        let mut buf = Vec::new();
        for (addr, len) in &r.data {
            buf.resize(*len as usize, 0);
            mem.read_slice(&mut buf, *addr)
                .map_err(std::io::Error::other)?;
            backing.file.write_all_at(&buf, offset)?;
            offset += u64::from(*len);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::device::Backing;
    use super::super::test_utils::*;
    use super::*;
    use crate::devices::virtio::test_utils::{TestDesc, VIRTQ_DESC_F_NEXT};
    use crate::devices::virtio::{VirtioDevice, INT_VRING};
    use std::sync::atomic::Ordering;
    use vm_memory::GuestAddress;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn read_returns_file_bytes_and_raises_the_interrupt() {
        let contents = pattern(4096);
        let mut h = BlockHarness::new("rootfs", &contents, false);
        let (status, len) = h
            .request(VIRTIO_BLK_T_IN, 2, &[(512, true), (1024, true)])
            .unwrap();
        assert_eq!((status, len), (VIRTIO_BLK_S_OK, 1537));
        let mut got = vec![0u8; 1536];
        h.mem.read_slice(&mut got, GuestAddress(DATA_ADDR)).unwrap();
        assert_eq!(got, contents[1024..2560]);
        assert_eq!(h.irq.evt.read().unwrap(), 1);
        assert_eq!(h.irq.status.load(Ordering::SeqCst) & INT_VRING, INT_VRING);
        assert_eq!(h.block.metrics.read_bytes, 1536);
    }

    #[test]
    fn write_reaches_the_backing_file() {
        let mut h = BlockHarness::new("data", &[0u8; 2048], false);
        h.mem
            .write_slice(&[0x5a; 512], GuestAddress(DATA_ADDR))
            .unwrap();
        let (status, len) = h.request(VIRTIO_BLK_T_OUT, 3, &[(512, false)]).unwrap();
        assert_eq!((status, len), (VIRTIO_BLK_S_OK, 1));
        let on_disk = std::fs::read(h.file.path()).unwrap();
        assert!(on_disk[1536..2048].iter().all(|b| *b == 0x5a));
        assert!(on_disk[..1536].iter().all(|b| *b == 0));
        assert_eq!(
            h.request(VIRTIO_BLK_T_FLUSH, 0, &[]).unwrap().0,
            VIRTIO_BLK_S_OK
        );
    }

    #[test]
    fn read_only_drive_refuses_writes() {
        let mut h = BlockHarness::new("ro", &[1u8; 1024], true);
        assert_eq!(
            h.request(VIRTIO_BLK_T_OUT, 0, &[(512, false)]).unwrap().0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(std::fs::read(h.file.path()).unwrap(), vec![1u8; 1024]);
        assert_ne!(
            h.block.avail_features() & super::super::device::VIRTIO_BLK_F_RO,
            0
        );
    }

    #[test]
    fn get_id_returns_the_serial() {
        let mut h = BlockHarness::new("container-rootfs", &[0u8; 512], false);
        let (status, len) = h.request(VIRTIO_BLK_T_GET_ID, 0, &[(20, true)]).unwrap();
        assert_eq!((status, len), (VIRTIO_BLK_S_OK, 21));
        let mut id = [0u8; 20];
        h.mem.read_slice(&mut id, GuestAddress(DATA_ADDR)).unwrap();
        assert_eq!(&id[..16], b"container-rootfs");
        assert_eq!(&id[16..], &[0; 4]);
    }

    #[test]
    fn empty_slot_fails_io_until_a_backing_file_is_set() {
        let mut h = BlockHarness::empty("slot0");
        let mut cap = [0u8; 8];
        h.block.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 0);
        assert_eq!(
            h.request(VIRTIO_BLK_T_IN, 0, &[(512, true)]).unwrap().0,
            VIRTIO_BLK_S_IOERR
        );

        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &[9u8; 4096]).unwrap();
        h.block.set_backing(Some(Backing::new(f, false).unwrap()));
        h.block.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        assert_eq!(
            h.request(VIRTIO_BLK_T_IN, 7, &[(512, true)]).unwrap().0,
            VIRTIO_BLK_S_OK
        );
        let mut got = [0u8; 512];
        h.mem.read_slice(&mut got, GuestAddress(DATA_ADDR)).unwrap();
        assert_eq!(got, [9u8; 512]);
    }

    #[test]
    fn malformed_requests_fail_without_touching_the_device() {
        let mut h = BlockHarness::new("d", &[0u8; 4096], false);
        // Past the end, partial sector, wrong direction, unsupported type.
        assert_eq!(
            h.request(VIRTIO_BLK_T_IN, 8, &[(512, true)]).unwrap(),
            (VIRTIO_BLK_S_IOERR, 1)
        );
        assert_eq!(
            h.request(VIRTIO_BLK_T_IN, 0, &[(100, true)]).unwrap(),
            (VIRTIO_BLK_S_IOERR, 1)
        );
        assert_eq!(
            h.request(VIRTIO_BLK_T_OUT, 0, &[(512, true)]).unwrap(),
            (VIRTIO_BLK_S_IOERR, 1)
        );
        assert_eq!(h.request(77, 0, &[]).unwrap(), (VIRTIO_BLK_S_UNSUPP, 1));
        // Buffer outside guest memory.
        let r = h.submit(&[
            TestDesc::read(HDR_ADDR, 16),
            TestDesc::write(0xffff_0000, 512),
            TestDesc::write(STATUS_ADDR, 1),
        ]);
        assert_eq!(r, Some((VIRTIO_BLK_S_IOERR, 1)));
        // Huge length: the chain is cut where its total length overflows, so no status
        // descriptor is trusted and nothing is written.
        h.mem.write_obj(0xffu8, GuestAddress(STATUS_ADDR)).unwrap();
        let r = h.submit(&[
            TestDesc::read(HDR_ADDR, 16),
            TestDesc::write(DATA_ADDR, u32::MAX),
            TestDesc::write(STATUS_ADDR, 1),
        ]);
        assert_eq!(r.map(|(_, len)| len), Some(0));
        assert_eq!(
            h.mem.read_obj::<u8>(GuestAddress(STATUS_ADDR)).unwrap(),
            0xff
        );
        // A status descriptor outside memory: completed with nothing written.
        let r = h.submit(&[
            TestDesc::read(HDR_ADDR, 16),
            TestDesc::write(0xffff_0000, 1),
        ]);
        assert!(r.is_some());
        assert_eq!(h.queue.used_elem(h.queue.used_idx() - 1).1, 0);
        assert!(!h.block.is_broken());
        assert_eq!(h.block.metrics.invalid_requests, 6);
        // The device still works.
        assert_eq!(
            h.request(VIRTIO_BLK_T_IN, 0, &[(512, true)]).unwrap().0,
            VIRTIO_BLK_S_OK
        );
    }

    #[test]
    fn descriptor_loop_terminates() {
        let mut h = BlockHarness::new("d", &[0u8; 4096], false);
        // Two descriptors pointing at each other forever.
        h.queue.write_desc(0, HDR_ADDR, 16, VIRTQ_DESC_F_NEXT, 1);
        h.queue
            .write_desc(1, DATA_ADDR, 512, VIRTQ_DESC_F_NEXT | 2, 0);
        h.queue.publish(0);
        h.block.process_queue(0);
        // Completed as invalid (the chain never reaches a status descriptor it can trust).
        assert_eq!(h.queue.used_idx(), 1);
        assert_eq!(h.block.metrics.invalid_requests, 1);
    }

    #[test]
    fn avail_index_far_ahead_marks_the_device_broken() {
        let mut h = BlockHarness::new("d", &[0u8; 4096], false);
        h.queue.set_avail_idx(1000);
        h.block.process_queue(0);
        assert!(h.block.is_broken());
        assert_eq!(h.queue.used_idx(), 0);
    }
}
