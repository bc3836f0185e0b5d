//! COM1 (ttyS0): a 16550A from vm-superio, its interrupt an irqfd on IRQ 4, its output
//! line-buffered into the console sink it shares with virtio-console (the guest console log).
//! Every byte is a VM exit: the pod VM's console is hvc0, this port serves tests and guests
//! booted with `console=ttyS0`.

use std::io::{self, Write};

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;
use crate::devices::console_sink::ConsoleOutput;

/// Interrupt line backed by an eventfd (registered as an irqfd).
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Buffers console bytes and hands whole lines to the console sink: the UART flushes after
/// every byte, and a syscall per byte would dominate boot time. `sync` pushes out what is left
/// at exit.
pub struct ConsoleWriter {
    out: ConsoleOutput,
    line: Vec<u8>,
}

const CONSOLE_LINE_MAX: usize = 1024;

impl ConsoleWriter {
    pub fn new(out: ConsoleOutput) -> Self {
        ConsoleWriter {
            out,
            line: Vec::with_capacity(CONSOLE_LINE_MAX),
        }
    }

    pub fn sync(&mut self) {
        if self.line.is_empty() {
            return;
        }
        self.out.write(&self.line);
        self.line.clear();
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.line.extend_from_slice(buf);
        if buf.contains(&b'\n') || self.line.len() >= CONSOLE_LINE_MAX {
            self.sync();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ConsoleWriter {
    fn drop(&mut self) {
        self.sync();
    }
}

/// The UART on the port I/O bus.
pub struct SerialDevice {
    pub serial: Serial<EventFdTrigger, vm_superio::serial::NoEvents, ConsoleWriter>,
}

/// The 8250's registers and receive FIFO in a snapshot (vm-superio's `SerialState`, which
/// has no serde support: mirrored field by field).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> Self {
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: ConsoleWriter) -> Self {
        SerialDevice {
            serial: Serial::new(EventFdTrigger(irq), out),
        }
    }

    /// An 8250 with the registers of a snapshot; refuses a receive FIFO longer than the
    /// 8250's.
    pub fn from_snapshot(
        irq: EventFd,
        out: ConsoleWriter,
        snapshot: &SerialSnapshot,
    ) -> Result<Self, String> {
        let serial = Serial::from_state(
            &SerialState::from(snapshot),
            EventFdTrigger(irq),
            vm_superio::serial::NoEvents,
            out,
        )
        .map_err(|e| format!("serial port state: {e:?}"))?;
        Ok(SerialDevice { serial })
    }

    pub fn snapshot(&self) -> SerialSnapshot {
        self.serial.state().into()
    }

    pub fn sync(&mut self) {
        self.serial.writer_mut().sync();
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.serial.read(offset as u8);
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            if let Err(e) = self.serial.write(offset as u8, data[0]) {
                tracing::warn!(error = ?e, "serial write failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::console_sink::ConsoleSink;
    use std::io::{Read, Seek};

    #[test]
    fn guest_bytes_reach_the_console_file_in_lines() {
        let file = tempfile::tempfile().unwrap();
        let mut reader = file.try_clone().unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(
            irq.try_clone().unwrap(),
            ConsoleWriter::new(ConsoleOutput::new(ConsoleSink::File(file)).unwrap()),
        );
        for b in b"hello\nwor" {
            dev.write(0, &[*b]);
        }
        // The clone shares the file offset with the writer: rewind before each read.
        reader.rewind().unwrap();
        let mut out = String::new();
        reader.read_to_string(&mut out).unwrap();
        assert_eq!(out, "hello\n");
        dev.sync();
        reader.rewind().unwrap();
        out.clear();
        reader.read_to_string(&mut out).unwrap();
        assert_eq!(out, "hello\nwor");
    }

    #[test]
    fn serial_registers_survive_a_snapshot_round_trip() {
        let out = || ConsoleWriter::new(ConsoleOutput::new(ConsoleSink::Null).unwrap());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), out());
        dev.write(3, &[0x80]); // DLAB on
        dev.write(0, &[0x0c]); // divisor low: 9600 baud
        dev.write(3, &[0x03]); // DLAB off, 8N1
        dev.write(1, &[0x01]); // receive interrupt enabled
        dev.write(7, &[0x5a]); // scratch
        let snapshot = dev.snapshot();
        let json = serde_json::to_string(&snapshot).unwrap();
        let back: SerialSnapshot = serde_json::from_str(&json).unwrap();
        let restored = SerialDevice::from_snapshot(irq, out(), &back).unwrap();
        assert_eq!(restored.snapshot(), snapshot);
        assert_eq!(snapshot.baud_divisor_low, 0x0c);
        assert_eq!(snapshot.line_control, 0x03);
        assert_eq!(snapshot.interrupt_enable, 0x01);
        assert_eq!(snapshot.scratch, 0x5a);
        let overfull = SerialSnapshot {
            in_buffer: vec![0; 4096],
            ..snapshot
        };
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        assert!(SerialDevice::from_snapshot(irq, out(), &overfull).is_err());
    }

    #[test]
    fn enabling_thr_interrupt_raises_the_irq() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(
            irq.try_clone().unwrap(),
            ConsoleWriter::new(ConsoleOutput::new(ConsoleSink::Null).unwrap()),
        );
        // IER bit 1: transmitter holding register empty interrupt.
        dev.write(1, &[0x02]);
        assert!(irq.read().unwrap() >= 1);
        // Wide accesses are ignored and read as zero.
        let mut wide = [0xffu8; 2];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0, 0]);
    }
}
