//! COM1 (ttyS0): a 16550A from vm-superio, its interrupt an irqfd on IRQ 4, its output
//! line-buffered into the console sink it shares with virtio-console (the guest console log).
//! Every byte is a VM exit: the pod VM's console is hvc0, this port serves tests and guests
//! booted with `console=ttyS0`.

use std::io::{self, Write};

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

impl SerialDevice {
    pub fn new(irq: EventFd, out: ConsoleWriter) -> Self {
        SerialDevice {
            serial: Serial::new(EventFdTrigger(irq), out),
        }
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
