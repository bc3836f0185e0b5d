//! The pod model without a VM: what it decides, refuses and publishes on its own.

use std::sync::{Arc, Mutex};

use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;

use super::container::{Container, VmPlan};
use super::process::{ExitInfo, Process, Status, StdioPaths};
use super::spec::Role;
use super::watch::exit_status_on_vm_exit;
use super::{lock, EventSink, Pod, VM_GONE_EXIT_STATUS};
use crate::error::Error;

/// Records the events the pod publishes, one line each.
#[derive(Default)]
struct RecordingSink(Mutex<Vec<String>>);

impl RecordingSink {
    fn push(&self, line: String) {
        self.0.lock().expect("sink").push(line);
    }

    fn lines(&self) -> Vec<String> {
        self.0.lock().expect("sink").clone()
    }
}

impl EventSink for RecordingSink {
    fn create(&self, container_id: &str, bundle: &str, _stdio: &StdioPaths, pid: u32) {
        self.push(format!("create {container_id} {bundle} pid={pid}"));
    }
    fn start(&self, container_id: &str, pid: u32) {
        self.push(format!("start {container_id} pid={pid}"));
    }
    fn exec_added(&self, container_id: &str, exec_id: &str) {
        self.push(format!("exec_added {container_id}/{exec_id}"));
    }
    fn exec_started(&self, container_id: &str, exec_id: &str, pid: u32) {
        self.push(format!("exec_started {container_id}/{exec_id} pid={pid}"));
    }
    fn exit(&self, container_id: &str, exec_id: &str, _pid: u32, status: u32, _at: Timestamp) {
        self.push(format!("exit {container_id}/{exec_id}={status}"));
    }
    fn exit_unstarted(
        &self,
        container_id: &str,
        exec_id: &str,
        _pid: u32,
        status: u32,
        _at: Timestamp,
    ) {
        self.push(format!("exit_unstarted {container_id}/{exec_id}={status}"));
    }
    fn delete(&self, container_id: &str, _pid: u32, status: u32, _at: Timestamp) {
        self.push(format!("delete {container_id}={status}"));
    }
    fn exec_deleted(&self, container_id: &str, exec_id: &str) {
        self.push(format!("exec_deleted {container_id}/{exec_id}"));
    }
    fn oom(&self, container_id: &str) {
        self.push(format!("oom {container_id}"));
    }
    fn paused(&self, container_id: &str) {
        self.push(format!("paused {container_id}"));
    }
    fn resumed(&self, container_id: &str) {
        self.push(format!("resumed {container_id}"));
    }
}

fn pod() -> (Pod, Arc<RecordingSink>) {
    let sink = Arc::new(RecordingSink::default());
    (Pod::new("k8s.io", sink.clone()), sink)
}

fn app() -> Role {
    Role::App {
        sandbox_id: "pod1".into(),
    }
}

/// Puts a container into the pod as if it had been created, its init process in `status`.
fn add_container(pod: &Pod, id: &str, role: Role, status: Status) -> Arc<Process> {
    let init = Arc::new(Process::new(id, "", StdioPaths::default(), None));
    init.set_pid(42);
    init.set_status(status);
    lock(&pod.inner.containers).insert(
        id.to_string(),
        Container::new(&format!("/bundles/{id}"), role, init.clone()),
    );
    init
}

fn exit_info(status: u32) -> ExitInfo {
    ExitInfo {
        status,
        at: Timestamp::default(),
    }
}

#[test]
fn a_containers_role_decides_vm_boot_or_join() {
    assert_eq!(VmPlan::for_role(&Role::Sandbox), VmPlan::Boot);
    assert_eq!(VmPlan::for_role(&Role::Standalone), VmPlan::Boot);
    assert_eq!(
        VmPlan::for_role(&app()),
        VmPlan::Join {
            sandbox_id: "pod1".into()
        }
    );
}

#[test]
fn only_the_sandbox_stays_out_of_the_guest() {
    let init = Arc::new(Process::new("c", "", StdioPaths::default(), None));
    assert!(!Container::new("/b", Role::Sandbox, init.clone()).in_guest);
    assert!(Container::new("/b", Role::Standalone, init.clone()).in_guest);
    assert!(Container::new("/b", app(), init).in_guest);
}

#[test]
fn a_vm_exit_ends_the_sandbox_with_its_kill_signal_and_the_rest_as_gone() {
    assert_eq!(exit_status_on_vm_exit(true, Some(15), 0), 128 + 15);
    assert_eq!(exit_status_on_vm_exit(true, Some(9), 137), 128 + 9);
    assert_eq!(exit_status_on_vm_exit(true, None, 0), 0);
    assert_eq!(exit_status_on_vm_exit(true, None, 1), VM_GONE_EXIT_STATUS);
    assert_eq!(exit_status_on_vm_exit(false, None, 0), VM_GONE_EXIT_STATUS);
}

#[test]
fn an_exit_before_the_start_is_published_as_unstarted() {
    let (pod, sink) = pod();
    let init = add_container(&pod, "c1", app(), Status::Created);
    pod.finish(&init, exit_info(137));
    assert_eq!(sink.lines(), vec!["exit_unstarted c1/=137"]);
    assert_eq!(init.status(), Status::Stopped);
}

#[test]
fn an_exit_is_published_once() {
    let (pod, sink) = pod();
    let init = add_container(&pod, "c1", app(), Status::Running);
    pod.finish(&init, exit_info(0));
    pod.finish(&init, exit_info(VM_GONE_EXIT_STATUS));
    assert_eq!(sink.lines(), vec!["exit c1/=0"]);
    assert_eq!(init.exit(), Some(exit_info(0)));
}

#[tokio::test]
async fn deleting_an_unknown_container_or_exec_is_not_found() {
    let (pod, sink) = pod();
    let Err(Error::NotFound(msg)) = pod.delete("nope", "").await else {
        panic!("an unknown container must be not found");
    };
    assert_eq!(msg, "container nope");
    add_container(&pod, "c1", app(), Status::Running);
    let Err(Error::NotFound(msg)) = pod.delete("c1", "e1").await else {
        panic!("an unknown exec must be not found");
    };
    assert_eq!(msg, "exec e1 of container c1");
    assert!(sink.lines().is_empty());
}

#[tokio::test]
async fn deleting_a_running_process_asks_to_kill_it_first() {
    let (pod, _) = pod();
    add_container(&pod, "c1", app(), Status::Running);
    let err = pod.delete("c1", "").await.expect_err("running");
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    assert!(err.to_string().contains("kill it first"), "{err}");
    assert!(pod.process("c1", "").is_ok(), "the container stays");
}

#[tokio::test]
async fn an_exec_is_added_announced_and_deleted_unstarted_with_status_0() {
    let (pod, sink) = pod();
    add_container(&pod, "c1", app(), Status::Running);
    pod.exec("c1", "e1", StdioPaths::default(), b"{}".to_vec())
        .expect("exec");
    let err = pod
        .exec("c1", "e1", StdioPaths::default(), b"{}".to_vec())
        .expect_err("twice");
    assert!(matches!(err, Error::AlreadyExists(_)), "{err}");
    assert_eq!(
        pod.process("c1", "e1").expect("exec").status(),
        Status::Created
    );
    let deleted = pod.delete("c1", "e1").await.expect("delete");
    assert_eq!(deleted.exit.status, 0);
    assert!(matches!(pod.process("c1", "e1"), Err(Error::NotFound(_))));
    assert_eq!(sink.lines(), vec!["exec_added c1/e1", "exec_deleted c1/e1"]);
}

#[test]
fn exec_needs_a_running_guest_container() {
    let (pod, sink) = pod();
    add_container(&pod, "sandbox", Role::Sandbox, Status::Running);
    add_container(&pod, "created", app(), Status::Created);
    let err = pod
        .exec("sandbox", "e1", StdioPaths::default(), Vec::new())
        .expect_err("sandbox");
    assert!(err.to_string().contains("pod sandbox"), "{err}");
    let err = pod
        .exec("created", "e1", StdioPaths::default(), Vec::new())
        .expect_err("not running");
    assert!(err.to_string().contains("is not running"), "{err}");
    let err = pod
        .exec("nope", "e1", StdioPaths::default(), Vec::new())
        .expect_err("unknown");
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    assert!(sink.lines().is_empty());
}

#[tokio::test]
async fn kill_refuses_bad_signals_and_finished_processes() {
    let (pod, _) = pod();
    let init = add_container(&pod, "c1", app(), Status::Running);
    for signal in [0, 65] {
        let err = pod.kill("c1", "", signal, false).await.expect_err("bad");
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    }
    init.record_exit(exit_info(0));
    let err = pod.kill("c1", "", 15, false).await.expect_err("finished");
    assert!(err.to_string().contains("already finished"), "{err}");
}

#[tokio::test]
async fn the_sandbox_starts_without_the_guest_and_only_from_created() {
    let (pod, sink) = pod();
    add_container(&pod, "sandbox", Role::Sandbox, Status::Created);
    assert_eq!(pod.start("sandbox", "").await.expect("start"), 42);
    assert_eq!(
        pod.process("sandbox", "").expect("init").status(),
        Status::Running
    );
    let err = pod.start("sandbox", "").await.expect_err("twice");
    assert!(err.to_string().contains("not created"), "{err}");
    assert_eq!(sink.lines(), vec!["start sandbox pid=42"]);
}

#[tokio::test]
async fn guest_operations_without_a_vm_fail_precondition() {
    let (pod, _) = pod();
    add_container(&pod, "c1", app(), Status::Running);
    let err = pod.stats("c1").await.err().expect("no VM");
    assert_eq!(
        err.to_string(),
        "failed precondition: the pod VM is not running"
    );
    let err = pod
        .update("sandbox", Some(b"{}"))
        .await
        .expect_err("unknown");
    assert!(matches!(err, Error::NotFound(_)), "{err}");
}

#[tokio::test]
async fn the_pod_shuts_down_only_when_empty() {
    let (pod, _) = pod();
    add_container(&pod, "c1", app(), Status::Created);
    assert!(!pod.shutdown().await);
    pod.delete("c1", "").await.expect("delete");
    assert!(pod.shutdown().await);
}
