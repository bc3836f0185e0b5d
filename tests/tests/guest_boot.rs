//! Our guest kernel and initramfs boot to our agent as /init.

use std::process::{Command, Stdio};
use std::time::Duration;

use kata_like_tests::artifact;
use kata_like_tests::console::ConsoleLines;

/// What the agent prints on the console once it serves requests.
const AGENT_READY: &str = "kata-like-agent: ready";

/// The reference VMM (QEMU's microvm machine) boots vmlinux + initramfs to the agent. This is the
/// stand-in the kernel-config issue allows in this one test; the VMM's own boot tests use ours.
#[test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
fn qemu_microvm_boots_our_kernel_and_initramfs_to_the_agent() {
    let kernel = artifact("KATA_LIKE_KERNEL");
    let initrd = artifact("KATA_LIKE_INITRD");
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm,x-option-roms=off,rtc=off,acpi=off",
            "-enable-kvm",
            "-cpu",
            "host",
            "-m",
            "256",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
            "-kernel",
        ])
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 reboot=t panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 starts");
    let mut console = ConsoleLines::new(qemu.stdout.take().expect("piped stdout"));
    let ready = console.wait_for(AGENT_READY, Duration::from_secs(300));
    let _ = qemu.kill();
    let _ = qemu.wait();
    assert!(
        ready.is_some(),
        "the agent never reported ready; console:\n{}",
        console.dump()
    );
    assert!(
        console
            .log
            .iter()
            .any(|l| l.contains("Run /init as init process")),
        "the kernel did not run /init from our initramfs; console:\n{}",
        console.dump()
    );
}
