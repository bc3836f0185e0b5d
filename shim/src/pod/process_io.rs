//! Processes of the pod: start, exec, signals and terminal size; the stdio copies between
//! containerd's FIFOs and the agent; the waiters that record each guest process's exit.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kata_like_protocol as pb;
use tokio::sync::oneshot;

use super::process::{now, timestamp_from_unix_nanos, ExitInfo, Process, Status, StdioPaths};
use super::spec::Role;
use super::stdio;
use super::{lock, Pod, VM_GONE_EXIT_STATUS};
use crate::error::{Error, Result};
use crate::vm::agent_client::Agent;
use crate::vm::vm::Vm;

/// Highest signal number a kill may carry.
const MAX_SIGNAL: u32 = 64;

/// The agent's WriteStdin/CloseStdin for one process.
struct AgentStdin {
    agent: Agent,
    container_id: String,
    exec_id: String,
}

impl stdio::StdinSink for AgentStdin {
    async fn write(&mut self, data: Vec<u8>) -> Result<usize> {
        self.agent
            .write_stdin(&self.container_id, &self.exec_id, data)
            .await
    }

    async fn close(&mut self) -> Result<()> {
        self.agent
            .close_stdin(&self.container_id, &self.exec_id)
            .await
    }
}

impl Pod {
    /// Starts a created process (`exec_id` "" is the container's init); returns its pid.
    pub async fn start(&self, id: &str, exec_id: &str) -> Result<u32> {
        let p = self.process(id, exec_id)?;
        let (role, in_guest) = self.container_role(id)?;
        if !p.transition(Status::Created, Status::Starting) {
            return Err(Error::FailedPrecondition(format!(
                "process {id}/{exec_id} is {:?}, not created",
                p.status()
            )));
        }
        let result = if !in_guest {
            // The sandbox: the VM is already running.
            debug_assert_eq!(role, Role::Sandbox);
            Ok(())
        } else if exec_id.is_empty() {
            // A missing VM returns at once and leaves the process Starting, as it always has.
            let vm = self.vm()?;
            vm.agent.start_container(id).await
        } else {
            self.start_exec(&p).await
        };
        if let Err(e) = result {
            p.transition(Status::Starting, Status::Created);
            return Err(e);
        }
        p.transition(Status::Starting, Status::Running);
        let pid = p.pid();
        if exec_id.is_empty() {
            self.inner.events.start(id, pid);
        } else {
            self.inner.events.exec_started(id, exec_id, pid);
        }
        tracing::info!(container_id = %id, exec_id = %exec_id, pid, "process started");
        Ok(pid)
    }

    async fn start_exec(&self, p: &Arc<Process>) -> Result<()> {
        let vm = self.vm()?;
        let spec = p
            .exec_spec
            .clone()
            .ok_or_else(|| Error::Other("exec without a process spec".into()))?;
        let pid = vm
            .agent
            .exec_process(pb::ExecProcessRequest {
                container_id: p.container_id.clone(),
                exec_id: p.exec_id.clone(),
                oci_process_json: spec,
                stdio: Some(pb::Stdio {
                    terminal: p.stdio.terminal,
                    stdin: !p.stdio.stdin.is_empty(),
                }),
            })
            .await?;
        p.set_pid(pid);
        // The process runs already; its output waits in its pipes until the streams attach.
        if let Err(e) = self.attach_stdio(&vm, p) {
            let _ = vm
                .agent
                .signal_process(&p.container_id, &p.exec_id, libc::SIGKILL as u32, false)
                .await;
            self.spawn_waiter(vm, p.clone());
            return Err(e);
        }
        self.spawn_waiter(vm, p.clone());
        Ok(())
    }

    /// Adds an exec process (created, not started) to a running guest container.
    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        stdio: StdioPaths,
        process_json: Vec<u8>,
    ) -> Result<()> {
        let mut containers = lock(&self.inner.containers);
        let c = containers
            .get_mut(id)
            .ok_or_else(|| Error::NotFound(format!("container {id}")))?;
        if !c.in_guest {
            return Err(Error::FailedPrecondition(format!(
                "container {id} is the pod sandbox, which has no processes to exec into"
            )));
        }
        if c.init.status() != Status::Running {
            return Err(Error::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        if c.execs.contains_key(exec_id) {
            return Err(Error::AlreadyExists(format!(
                "exec {exec_id} of container {id}"
            )));
        }
        c.execs.insert(
            exec_id.to_string(),
            Arc::new(Process::new(id, exec_id, stdio, Some(process_json))),
        );
        drop(containers);
        self.inner.events.exec_added(id, exec_id);
        Ok(())
    }

    /// Signals a process (`all`: every process of the container); the sandbox's signal stops
    /// the VM.
    pub async fn kill(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let p = self.process(id, exec_id)?;
        let (role, _) = self.container_role(id)?;
        if signal == 0 || signal > MAX_SIGNAL {
            return Err(Error::InvalidArgument(format!(
                "signal {signal} is not valid"
            )));
        }
        if p.status() == Status::Stopped {
            return Err(Error::NotFound(format!(
                "process {id}/{exec_id} already finished"
            )));
        }
        if role == Role::Sandbox {
            // The sandbox's process is the VM: killing it stops the VM.
            if let Some(c) = lock(&self.inner.containers).get_mut(id) {
                c.kill_signal.get_or_insert(signal);
            }
            let vm = self.vm()?;
            let force = signal == libc::SIGKILL as u32;
            tracing::info!(container_id = %id, signal, "stopping the pod VM");
            tokio::spawn(async move {
                vm.stop(force).await;
            });
            return Ok(());
        }
        let vm = self.vm()?;
        match vm.agent.signal_process(id, exec_id, signal, all).await {
            Ok(()) => Ok(()),
            Err(_) if vm.exit().is_some() => Err(Error::NotFound(format!(
                "process {id}/{exec_id} already finished (the pod VM is gone)"
            ))),
            Err(e) => Err(e),
        }
    }

    /// Resizes a process's terminal.
    pub async fn resize(&self, id: &str, exec_id: &str, width: u32, height: u32) -> Result<()> {
        let p = self.process(id, exec_id)?;
        if !p.stdio.terminal {
            return Err(Error::FailedPrecondition(format!(
                "process {id}/{exec_id} has no terminal"
            )));
        }
        if width > u16::MAX as u32 || height > u16::MAX as u32 {
            return Err(Error::InvalidArgument("terminal size out of range".into()));
        }
        let vm = self.guest_container(id)?;
        vm.agent.resize_tty(id, exec_id, height, width).await
    }

    /// Starts the copies between containerd's FIFOs and the agent for one process.
    pub(super) fn attach_stdio(&self, vm: &Arc<Vm>, p: &Arc<Process>) -> Result<()> {
        let outputs: Vec<(pb::OutputFd, &str)> = if p.stdio.terminal {
            vec![(pb::OutputFd::Stdout, p.stdio.stdout.as_str())]
        } else {
            vec![
                (pb::OutputFd::Stdout, p.stdio.stdout.as_str()),
                (pb::OutputFd::Stderr, p.stdio.stderr.as_str()),
            ]
        };
        for (fd, path) in outputs {
            let fifo = if path.is_empty() {
                None
            } else {
                Some(stdio::open_output_fifo(Path::new(path))?)
            };
            let agent = vm.agent.clone();
            let (cid, eid) = (p.container_id.clone(), p.exec_id.clone());
            p.add_output_task(tokio::spawn(async move {
                let result = match agent.process_output(&cid, &eid, fd).await {
                    Ok(stream) => stdio::copy_output(stream, fifo).await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(bytes) => tracing::debug!(container_id = %cid, exec_id = %eid, ?fd, bytes, "output copied"),
                    Err(e) => tracing::warn!(container_id = %cid, exec_id = %eid, ?fd, error = %e, "output copy ended with an error"),
                }
            }));
        }
        if !p.stdio.stdin.is_empty() {
            let input = stdio::open_input_fifo(Path::new(&p.stdio.stdin))?;
            let (close_tx, close_rx) = oneshot::channel();
            p.set_stdin_closer(close_tx);
            let mut sink = AgentStdin {
                agent: vm.agent.clone(),
                container_id: p.container_id.clone(),
                exec_id: p.exec_id.clone(),
            };
            tokio::spawn(async move {
                match stdio::pump_stdin(input, &mut sink, close_rx).await {
                    Ok(bytes) => {
                        tracing::debug!(container_id = %sink.container_id, exec_id = %sink.exec_id, bytes, "stdin copied; the process's stdin is closed")
                    }
                    Err(e) => {
                        tracing::warn!(container_id = %sink.container_id, exec_id = %sink.exec_id, error = %e, "stdin copy ended with an error")
                    }
                }
            });
        }
        Ok(())
    }

    /// Waits for a guest process to exit, lets its output drain, then records the exit.
    pub(super) fn spawn_waiter(&self, vm: Arc<Vm>, p: Arc<Process>) {
        let pod = self.clone();
        tokio::spawn(async move {
            let info = loop {
                match vm.agent.wait_process(&p.container_id, &p.exec_id).await {
                    Ok(exit) => {
                        break ExitInfo {
                            status: exit.exit_status as u32,
                            at: timestamp_from_unix_nanos(exit.exited_at_unix_nanos),
                        };
                    }
                    Err(Error::NotFound(_)) => {
                        tracing::warn!(container_id = %p.container_id, exec_id = %p.exec_id, "the agent no longer knows the process");
                        break ExitInfo {
                            status: VM_GONE_EXIT_STATUS,
                            at: now(),
                        };
                    }
                    Err(e) => {
                        if vm.exit().is_some() {
                            // The VM watcher records the exit of every process.
                            return;
                        }
                        tracing::debug!(container_id = %p.container_id, exec_id = %p.exec_id, error = %e, "WaitProcess failed; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            };
            p.drain_output().await;
            pod.finish(&p, info);
        });
    }
}
