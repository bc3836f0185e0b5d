//! What the VMM thread does for a vhost-user-fs device: hand the backend the memory table and
//! the rings at activation, forward queue notifications (virtio-mmio's QueueNotify lands on the
//! transport's ioeventfd, which the VMM thread owns), raise the interrupt when the backend
//! signals a used buffer (virtio-mmio's InterruptStatus must say "used buffer" before the
//! guest's handler looks at the rings, so the backend cannot signal the irqfd directly), and
//! answer every request with ENOTCONN once the backend is gone, so that the guest's file
//! operations fail instead of hanging and the VM and its other devices go on.

use std::os::unix::io::AsRawFd;

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::EventSet;

use super::device::{Fs, HIPRIO_QUEUE};
use crate::devices::virtio::{queue, ActivateContext, ActivateError, DEVICE_TOKEN_BASE, INT_VRING};
use crate::vstate::memory::GuestMemoryMmap;

/// Sub token of the backend socket (watched for hang-up); queue i's call eventfd is
/// `CALL_TOKEN_BASE + i`.
const SOCKET_TOKEN: u32 = DEVICE_TOKEN_BASE;
const CALL_TOKEN_BASE: u32 = DEVICE_TOKEN_BASE + 1;
/// The FUSE reply error for requests nobody will serve (what a dead FUSE daemon gives too).
const ENOTCONN: i32 = libc::ENOTCONN;
/// sizeof(struct fuse_in_header) and sizeof(struct fuse_out_header).
const FUSE_IN_HEADER_LEN: u32 = 40;
const FUSE_OUT_HEADER_LEN: u32 = 16;

fn backend_error(what: &str, tag: &str, e: vhost::Error) -> ActivateError {
    ActivateError::Io(std::io::Error::other(format!(
        "virtio-fs {tag:?}: {what} failed on the vhost-user backend: {e}"
    )))
}

impl Fs {
    /// DRIVER_OK: tells the backend the acked features, the guest memory and each ready ring,
    /// then watches the call eventfds and the backend socket.
    pub(super) fn activate_backend(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let tag = self.tag.clone();
        let err = |what: &str| {
            let tag = tag.clone();
            let what = what.to_string();
            move |e| backend_error(&what, &tag, e)
        };
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let features = self.state.acked_features | (self.backend_features & protocol);
        self.backend
            .set_features(features)
            .map_err(err("SET_FEATURES"))?;
        let regions = ctx
            .mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(err("guest memory is not shared (memfd): the memory table"))?;
        self.backend
            .set_mem_table(&regions)
            .map_err(err("SET_MEM_TABLE"))?;
        for (i, q) in ctx.queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            let host = |addr: u64| -> Result<u64, ActivateError> {
                ctx.mem
                    .get_host_address(GuestAddress(addr))
                    .map(|p| p as u64)
                    .map_err(|e| ActivateError::BadQueue(format!("queue {i} at {addr:#x}: {e}")))
            };
            let ring = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: host(q.desc_table())?,
                used_ring_addr: host(q.used_ring())?,
                avail_ring_addr: host(q.avail_ring())?,
                log_addr: None,
            };
            self.backend
                .set_vring_num(i, q.size())
                .map_err(err("SET_VRING_NUM"))?;
            self.backend
                .set_vring_addr(i, &ring)
                .map_err(err("SET_VRING_ADDR"))?;
            self.backend
                .set_vring_base(i, 0)
                .map_err(err("SET_VRING_BASE"))?;
            let (Some(call), Some(kick)) = (self.call_evts.get(i), self.kick_evts.get(i)) else {
                return Err(ActivateError::BadQueue(format!("queue {i} does not exist")));
            };
            self.backend
                .set_vring_call(i, call)
                .map_err(err("SET_VRING_CALL"))?;
            self.backend
                .set_vring_kick(i, kick)
                .map_err(err("SET_VRING_KICK"))?;
            if features & protocol != 0 {
                self.backend
                    .set_vring_enable(i, true)
                    .map_err(err("SET_VRING_ENABLE"))?;
            }
            ctx.events
                .add(call.as_raw_fd(), CALL_TOKEN_BASE + i as u32, EventSet::IN)?;
        }
        self.state
            .activate(ctx, Some((self.socket.as_raw_fd(), SOCKET_TOKEN)))?;
        if let Some(active) = &self.state.active {
            // Only hang-up matters on the socket: replies are read where they are asked for.
            active.events.modify(
                self.socket.as_raw_fd(),
                SOCKET_TOKEN,
                EventSet::READ_HANG_UP | EventSet::HANG_UP,
            )?;
        }
        tracing::info!(tag = %self.tag, features, "virtio-fs activated on its vhost-user backend");
        Ok(())
    }

    /// The guest notified queue `index`: pass it on to the backend, or answer it ourselves
    /// when the backend is gone.
    pub(super) fn forward_kick(&mut self, index: usize) {
        if self.backend_dead {
            self.fail_pending_requests(index);
            return;
        }
        if let Some(kick) = self.kick_evts.get(index) {
            self.metrics.kicks += 1;
            if let Err(e) = kick.write(1) {
                tracing::warn!(tag = %self.tag, queue = index, error = %e, "cannot notify the virtio-fs backend");
            }
        }
    }

    pub(super) fn handle_event(&mut self, sub: u32, _events: u32) {
        if sub == SOCKET_TOKEN {
            self.backend_gone();
            return;
        }
        let index = sub.wrapping_sub(CALL_TOKEN_BASE) as usize;
        let Some(call) = self.call_evts.get(index) else {
            return;
        };
        // Drain the counter: one interrupt covers every buffer used since the last one.
        let _ = call.read();
        self.metrics.interrupts += 1;
        if let Some(active) = &self.state.active {
            active.irq.trigger(INT_VRING);
        }
    }

    /// The backend's socket hung up: it died or was killed. Its rings are ours from here:
    /// every request it had not completed, and every later one, gets ENOTCONN.
    fn backend_gone(&mut self) {
        if self.backend_dead {
            return;
        }
        self.backend_dead = true;
        self.metrics.backend_failures += 1;
        tracing::error!(
            tag = %self.tag,
            "the virtio-fs backend (virtiofsd) hung up: file operations on this file system now fail with ENOTCONN"
        );
        let Some(active) = self.state.active.as_mut() else {
            return;
        };
        active.events.remove(self.socket.as_raw_fd());
        for fd in self.call_evts.iter().map(|e| e.as_raw_fd()) {
            active.events.remove(fd);
        }
        let mem = active.mem.clone();
        for q in active.queues.iter_mut().filter(|q| q.ready()) {
            // The used index is the backend's last word on this ring: every chain after it is
            // still the driver's, whether the backend had read it or not.
            let used_idx = mem
                .read_obj::<u16>(GuestAddress(q.used_ring().wrapping_add(2)))
                .unwrap_or(0);
            q.set_next_avail(used_idx);
            q.set_next_used(used_idx);
        }
        for index in 0..self.kick_evts.len() {
            self.fail_pending_requests(index);
        }
    }

    fn fail_pending_requests(&mut self, index: usize) {
        let failed = queue::drain_queue(self, index, |fs, mem, descs| {
            fs.metrics.failed_requests += 1;
            if index == HIPRIO_QUEUE {
                // FORGET and INTERRUPT get no reply.
                return 0;
            }
            error_reply(mem, descs, ENOTCONN)
        });
        if failed > 0 {
            tracing::debug!(tag = %self.tag, queue = index, failed, "virtio-fs requests failed: backend gone");
        }
    }

    /// Driver reset: stop the backend's rings (GET_VRING_BASE) and unwatch our fds.
    pub(super) fn reset_backend(&mut self) {
        if let Some(active) = self.state.reset() {
            active.events.remove(self.socket.as_raw_fd());
            for (i, call) in self.call_evts.iter().enumerate() {
                active.events.remove(call.as_raw_fd());
                if !self.backend_dead && active.queues.get(i).is_some_and(|q| q.ready()) {
                    if let Err(e) = self.backend.get_vring_base(i) {
                        tracing::warn!(tag = %self.tag, queue = i, error = %e, "stopping a virtio-fs ring at reset failed");
                    }
                }
            }
        }
        if !self.backend_dead {
            let _ = self.backend.reset_device();
        }
    }
}

/// Writes a FUSE reply carrying only `errno` for the request in `descs`; returns its length
/// (0 when the chain has no readable request header or no writable room for the reply).
fn error_reply(mem: &GuestMemoryMmap, descs: &[Descriptor], errno: i32) -> u32 {
    let Some(request) = descs.first().filter(|d| !d.is_write_only()) else {
        return 0;
    };
    let Some(reply) = descs
        .iter()
        .find(|d| d.is_write_only() && d.len() >= FUSE_OUT_HEADER_LEN)
    else {
        return 0;
    };
    if request.len() < FUSE_IN_HEADER_LEN {
        return 0;
    }
    let Ok(unique) = mem.read_obj::<u64>(GuestAddress(request.addr().0.wrapping_add(8))) else {
        return 0;
    };
    let mut header = [0u8; FUSE_OUT_HEADER_LEN as usize];
    header[0..4].copy_from_slice(&FUSE_OUT_HEADER_LEN.to_le_bytes());
    header[4..8].copy_from_slice(&(-errno).to_le_bytes());
    header[8..16].copy_from_slice(&unique.to_le_bytes());
    match mem.write_slice(&header, reply.addr()) {
        Ok(()) => FUSE_OUT_HEADER_LEN,
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    use vmm_sys_util::epoll::Epoll;

    use super::*;
    use crate::devices::virtio::test_utils::{test_memory, TestDesc, TestQueue};
    use crate::devices::virtio::{
        EventRegistrar, IrqTrigger, VirtioDevice, TYPE_FS, VIRTIO_F_VERSION_1,
    };

    /// A device whose backend end of the socket is `peer` (no backend runs behind it).
    fn device(backend_features: u64) -> (Fs, UnixStream) {
        let (ours, peer) = UnixStream::pair().unwrap();
        (
            Fs::from_connected("shared", ours, backend_features).unwrap(),
            peer,
        )
    }

    #[test]
    fn config_space_holds_the_tag_and_one_request_queue() {
        let (fs, _peer) = device(VIRTIO_F_VERSION_1);
        assert_eq!(fs.device_type(), TYPE_FS);
        let mut tag = [0xffu8; 36];
        fs.read_config(0, &mut tag);
        assert_eq!(&tag[..6], b"shared");
        assert!(tag[6..].iter().all(|b| *b == 0));
        let mut queues = [0u8; 4];
        fs.read_config(36, &mut queues);
        assert_eq!(u32::from_le_bytes(queues), 1);
        assert_eq!(fs.queue_max_sizes().len(), 2);
    }

    #[test]
    fn offers_only_the_backend_features_the_transport_handles() {
        let event_idx = 1u64 << 29;
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let (fs, _peer) = device(VIRTIO_F_VERSION_1 | event_idx | protocol);
        assert_eq!(fs.avail_features(), VIRTIO_F_VERSION_1);
    }

    #[test]
    fn requests_pending_when_the_backend_hangs_up_fail_with_enotconn() {
        let mem = test_memory();
        let hiprio = TestQueue::new(&mem, 0x1_0000, 8);
        let mut requests = TestQueue::new(&mem, 0x2_0000, 8);
        let (mut fs, peer) = device(VIRTIO_F_VERSION_1);
        let irq = Arc::new(IrqTrigger::new().unwrap());
        // Activated without the backend handshake (no backend runs behind `peer`).
        fs.state
            .activate(
                ActivateContext {
                    mem: mem.clone(),
                    queues: vec![hiprio.queue(), requests.queue()],
                    irq: irq.clone(),
                    events: EventRegistrar::new(Arc::new(Epoll::new().unwrap()), 0),
                },
                None,
            )
            .unwrap();
        // A FUSE request: fuse_in_header with unique 0x42, then room for the reply.
        mem.write_obj(0x42u64, GuestAddress(0x10_0008)).unwrap();
        requests.add_chain(&[
            TestDesc::read(0x10_0000, FUSE_IN_HEADER_LEN),
            TestDesc::write(0x11_0000, 4096),
        ]);
        // While the backend lives, a notification is only passed on.
        fs.process_queue(1);
        assert_eq!(requests.used_idx(), 0);
        assert_eq!(fs.metrics.kicks, 1);

        drop(peer);
        fs.process_event(SOCKET_TOKEN, 0);
        assert_eq!(requests.used_idx(), 1);
        assert_eq!(requests.used_elem(0).1, FUSE_OUT_HEADER_LEN);
        let mut reply = [0u8; 16];
        mem.read_slice(&mut reply, GuestAddress(0x11_0000)).unwrap();
        assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), 16);
        assert_eq!(
            i32::from_le_bytes(reply[4..8].try_into().unwrap()),
            -libc::ENOTCONN
        );
        assert_eq!(u64::from_le_bytes(reply[8..16].try_into().unwrap()), 0x42);
        assert_eq!(
            irq.status.load(std::sync::atomic::Ordering::SeqCst) & INT_VRING,
            INT_VRING
        );

        // Later requests get the same answer at once.
        requests.add_chain(&[
            TestDesc::read(0x10_0000, FUSE_IN_HEADER_LEN),
            TestDesc::write(0x11_0000, 16),
        ]);
        fs.process_queue(1);
        assert_eq!(requests.used_idx(), 2);
        assert_eq!(fs.metrics.backend_failures, 1);
        assert_eq!(fs.metrics.failed_requests, 2);
        assert!(!fs.is_broken());
    }

    #[test]
    fn a_backend_signal_raises_the_used_buffer_interrupt() {
        let mem = test_memory();
        let q0 = TestQueue::new(&mem, 0x1_0000, 8);
        let q1 = TestQueue::new(&mem, 0x2_0000, 8);
        let (mut fs, _peer) = device(VIRTIO_F_VERSION_1);
        let irq = Arc::new(IrqTrigger::new().unwrap());
        fs.state
            .activate(
                ActivateContext {
                    mem: mem.clone(),
                    queues: vec![q0.queue(), q1.queue()],
                    irq: irq.clone(),
                    events: EventRegistrar::new(Arc::new(Epoll::new().unwrap()), 0),
                },
                None,
            )
            .unwrap();
        fs.call_evts[1].write(1).unwrap();
        fs.process_event(CALL_TOKEN_BASE + 1, 0);
        assert_eq!(
            irq.status.load(std::sync::atomic::Ordering::SeqCst),
            INT_VRING
        );
        assert_eq!(irq.evt.read().unwrap(), 1);
        assert_eq!(fs.metrics.interrupts, 1);
        // A stray token is ignored.
        fs.process_event(CALL_TOKEN_BASE + 7, 0);
        assert_eq!(fs.metrics.interrupts, 1);
    }
}
