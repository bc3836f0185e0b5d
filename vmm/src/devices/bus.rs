//! Address-range dispatch of port I/O and MMIO exits to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through a bus. `offset` is relative to the device's base.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("bus range {0:#x}+{1:#x} overlaps another device or is empty")]
    Overlap(u64, u64),
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping device ranges.
#[derive(Clone, Default)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), Error> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(Error::Overlap(base, len))?;
        if let Some((b, e)) = self.devices.range(..end).next_back() {
            if b + e.len > base {
                return Err(Error::Overlap(base, len));
            }
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64, len: usize) -> Option<(u64, &Entry)> {
        let (base, entry) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        if offset.checked_add(len as u64)? <= entry.len {
            Some((offset, entry))
        } else {
            None
        }
    }

    /// Returns false when no device covers `[addr, addr + data.len())`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, entry)) => {
                lock(&entry.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, entry)) => {
                lock(&entry.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned lock: a panic in another thread already ends
/// the VMM, and device state stays memory-safe either way.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_relative_offsets() {
        let dev = Arc::new(Mutex::new(Recorder(Vec::new())));
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, dev.clone()).unwrap();
        assert!(bus.write(0x104, &[1, 2]));
        let mut buf = [0u8; 4];
        assert!(bus.read(0x10c, &mut buf));
        assert_eq!(buf, [0xc; 4]);
        assert!(!bus.read(0x10e, &mut buf), "access straddling the end");
        assert!(!bus.write(0xff, &[0]));
        assert_eq!(dev.lock().unwrap().0, vec![(4, vec![1, 2])]);
    }

    #[test]
    fn overlapping_ranges_are_rejected() {
        let dev = Arc::new(Mutex::new(Recorder(Vec::new())));
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, dev.clone()).unwrap();
        assert!(bus.insert(0x108, 0x10, dev.clone()).is_err());
        assert!(bus.insert(0xf8, 0x10, dev.clone()).is_err());
        assert!(bus.insert(0x110, 0, dev.clone()).is_err());
        assert!(bus.insert(u64::MAX, 2, dev.clone()).is_err());
        bus.insert(0x110, 0x10, dev).unwrap();
    }
}
