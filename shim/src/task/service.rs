//! The task API (containerd runtime v2) of one pod's shim: translation only. Each request
//! becomes an operation of the pod model (`crate::pod`), its result the response containerd
//! expects; the pod holds the VM, the containers and their processes.

use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim_protos::api;
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::ttrpc::Code;

use crate::error::{status, Error, Result};
use crate::ids::check_id;
use crate::pod::container::{ContainerStats, Deleted, NewContainer};
use crate::pod::process::StdioPaths;
use crate::pod::rootfs::RootfsMount;
use crate::pod::{spec, EventSink, Pod};
use crate::task::metrics;

type TtrpcResult<T> = containerd_shim_protos::ttrpc::Result<T>;

#[derive(Clone)]
pub struct Service {
    pod: Pod,
    exit: Arc<ExitSignal>,
}

impl Service {
    pub fn new(namespace: &str, events: Arc<dyn EventSink>, exit: Arc<ExitSignal>) -> Service {
        Service {
            pod: Pod::new(namespace, events),
            exit,
        }
    }

    async fn do_create(&self, req: api::CreateTaskRequest) -> Result<u32> {
        check_id("container", &req.id)?;
        if !req.checkpoint.is_empty() {
            return Err(Error::Unimplemented("checkpoint/restore".into()));
        }
        let rootfs = req
            .rootfs
            .iter()
            .map(|m| RootfsMount {
                fs_type: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect();
        self.pod
            .create(NewContainer {
                id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs,
                stdio: StdioPaths {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                },
                options: req.options.into_option(),
            })
            .await
    }

    fn do_exec(&self, req: api::ExecProcessRequest) -> Result<()> {
        check_id("exec", &req.exec_id)?;
        let spec_any = req
            .spec
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("exec without a process spec".into()))?;
        let process_json = spec::guest_process(&spec_any.value)?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        self.pod.exec(&req.id, &req.exec_id, stdio, process_json)
    }

    async fn do_pids(&self, id: &str) -> Result<api::PidsResponse> {
        let processes = self
            .pod
            .pids(id)
            .await?
            .into_iter()
            .map(|pid| api::ProcessInfo {
                pid,
                ..Default::default()
            })
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn do_stats(
        &self,
        id: &str,
    ) -> Result<containerd_shim_protos::protobuf::well_known_types::any::Any> {
        let m = match self.pod.stats(id).await? {
            ContainerStats::VmmProcess(pid) => metrics::for_vmm_process(pid)?,
            ContainerStats::PodCgroup(stats) | ContainerStats::Guest(stats) => {
                metrics::from_cgroup_stats(&stats)
            }
        };
        metrics::to_any(&m)
    }

    fn do_state(&self, req: &api::StateRequest) -> Result<api::StateResponse> {
        let p = self.pod.process(&req.id, &req.exec_id)?;
        let bundle = self.pod.bundle(&req.id);
        let exit = p.exit();
        Ok(api::StateResponse {
            id: if req.exec_id.is_empty() {
                req.id.clone()
            } else {
                req.exec_id.clone()
            },
            bundle,
            pid: p.pid(),
            status: p.status().to_proto().into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.as_ref().map(|e| e.status).unwrap_or(0),
            exited_at: exit.map(|e| e.at).into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn do_shutdown(&self) {
        if self.pod.shutdown().await {
            tracing::info!("last container gone; shim exits");
            self.exit.signal();
        }
    }
}

fn log_err<T>(call: &str, id: &str, r: Result<T>) -> TtrpcResult<T> {
    r.map_err(|e| {
        tracing::warn!(call, container_id = %id, error = %e, "request failed");
        e.into()
    })
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let id = req.id.clone();
        let pid = log_err("create", &id, self.do_create(req).await)?;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let id = req.id.clone();
        let pid = log_err("start", &id, self.pod.start(&req.id, &req.exec_id).await)?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        Ok(self.do_state(&req)?)
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        log_err("pids", &req.id, self.do_pids(&req.id).await)
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let id = req.id.clone();
        let killed = self.pod.kill(&id, &req.exec_id, req.signal, req.all).await;
        log_err("kill", &id, killed)?;
        Ok(api::Empty::default())
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let id = req.id.clone();
        log_err("exec", &id, self.do_exec(req))?;
        Ok(api::Empty::default())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let id = req.id.clone();
        let resized = self
            .pod
            .resize(&id, &req.exec_id, req.width, req.height)
            .await;
        log_err("resize_pty", &id, resized)?;
        Ok(api::Empty::default())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        let p = self.pod.process(&req.id, &req.exec_id)?;
        if req.stdin {
            p.close_stdin();
        }
        Ok(api::Empty::default())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let id = req.id.clone();
        let resources = req.resources.as_ref().map(|r| r.value.as_slice());
        log_err("update", &id, self.pod.update(&id, resources).await)?;
        Ok(api::Empty::default())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let p = self.pod.process(&req.id, &req.exec_id)?;
        let info = p.wait().await;
        Ok(api::WaitResponse {
            exit_status: info.status,
            exited_at: Some(info.at).into(),
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let id = req.id.clone();
        let Deleted { pid, exit } =
            log_err("delete", &id, self.pod.delete(&id, &req.exec_id).await)?;
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: Some(exit.at).into(),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        log_err("pause", &req.id, self.pod.pause(&req.id, true).await)?;
        Ok(api::Empty::default())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        log_err("resume", &req.id, self.pod.pause(&req.id, false).await)?;
        Ok(api::Empty::default())
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let any = log_err("stats", &req.id, self.do_stats(&req.id).await)?;
        Ok(api::StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(status(
            Code::UNIMPLEMENTED,
            "checkpoint is not supported by the kata-like runtime",
        ))
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self.pod.vm_pid().unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        self.do_shutdown().await;
        Ok(api::Empty::default())
    }
}
