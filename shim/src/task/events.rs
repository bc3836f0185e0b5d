//! Task events to containerd, in the order it requires.
//!
//! Events leave through one queue in publish order. containerd's CRI drops or mis-handles an
//! exit that arrives before the start of the same process, and a process in the guest can exit
//! before the shim has published its start: so an exit of a process whose start (or exec-started)
//! has not been published yet is held back and released right after that start.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use containerd_shim::publisher::RemotePublisher;
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::MessageDyn;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::context::Context;
use tokio::sync::mpsc;

use crate::pod::process::StdioPaths;
use crate::pod::EventSink;

/// One event ready to send: its topic and message.
pub struct Envelope {
    pub topic: &'static str,
    pub message: Box<dyn MessageDyn>,
}

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?}", self.topic, self.message)
    }
}

/// Key of a process: (container id, exec id), "" for the init process.
type ProcessKey = (String, String);

#[derive(Default)]
struct Order {
    started: HashSet<ProcessKey>,
    held_exits: HashMap<ProcessKey, Envelope>,
}

/// The shim's event publisher.
#[derive(Clone)]
pub struct Events {
    queue: mpsc::UnboundedSender<Envelope>,
    order: Arc<Mutex<Order>>,
}

impl Events {
    /// Events go to containerd through the shim crate's publisher (which retries failed sends).
    pub fn to_containerd(publisher: RemotePublisher, namespace: String) -> Events {
        let (tx, mut rx) = mpsc::unbounded_channel::<Envelope>();
        tokio::spawn(async move {
            while let Some(env) = rx.recv().await {
                let topic = env.topic;
                if let Err(e) = publisher
                    .publish(Context::default(), topic, &namespace, env.message)
                    .await
                {
                    tracing::error!(topic, error = %e, "publishing an event failed");
                }
            }
        });
        Events::with_queue(tx)
    }

    /// Events go to a channel (tests).
    pub fn with_queue(queue: mpsc::UnboundedSender<Envelope>) -> Events {
        Events {
            queue,
            order: Arc::new(Mutex::new(Order::default())),
        }
    }

    fn send(&self, topic: &'static str, message: Box<dyn MessageDyn>) {
        tracing::debug!(topic, "event");
        if self.queue.send(Envelope { topic, message }).is_err() {
            tracing::error!(topic, "event queue closed; event lost");
        }
    }

    fn order(&self) -> std::sync::MutexGuard<'_, Order> {
        self.order.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn started(&self, container_id: &str, exec_id: &str) {
        let key = (container_id.to_string(), exec_id.to_string());
        let held = {
            let mut order = self.order();
            order.started.insert(key.clone());
            order.held_exits.remove(&key)
        };
        if let Some(env) = held {
            self.send(env.topic, env.message);
        }
    }
}

/// The events the pod model publishes, in containerd's order.
impl EventSink for Events {
    fn create(&self, container_id: &str, bundle: &str, stdio: &StdioPaths, pid: u32) {
        let io = TaskIO {
            stdin: stdio.stdin.clone(),
            stdout: stdio.stdout.clone(),
            stderr: stdio.stderr.clone(),
            terminal: stdio.terminal,
            ..Default::default()
        };
        self.send(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: container_id.into(),
                bundle: bundle.into(),
                io: Some(io).into(),
                pid,
                ..Default::default()
            }),
        );
    }

    fn start(&self, container_id: &str, pid: u32) {
        self.send(
            topics::TASK_START_EVENT_TOPIC,
            Box::new(TaskStart {
                container_id: container_id.into(),
                pid,
                ..Default::default()
            }),
        );
        self.started(container_id, "");
    }

    fn exec_added(&self, container_id: &str, exec_id: &str) {
        self.send(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: container_id.into(),
                exec_id: exec_id.into(),
                ..Default::default()
            }),
        );
    }

    fn exec_started(&self, container_id: &str, exec_id: &str, pid: u32) {
        self.send(
            topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            Box::new(TaskExecStarted {
                container_id: container_id.into(),
                exec_id: exec_id.into(),
                pid,
                ..Default::default()
            }),
        );
        self.started(container_id, exec_id);
    }

    /// The exit of a process; `exec_id` is "" for a container's init process (the event's `id`
    /// is then the container id, as containerd expects).
    fn exit(
        &self,
        container_id: &str,
        exec_id: &str,
        pid: u32,
        exit_status: u32,
        exited_at: Timestamp,
    ) {
        let id = if exec_id.is_empty() {
            container_id
        } else {
            exec_id
        };
        let message = Box::new(TaskExit {
            container_id: container_id.into(),
            id: id.into(),
            pid,
            exit_status,
            exited_at: Some(exited_at).into(),
            ..Default::default()
        });
        let key = (container_id.to_string(), exec_id.to_string());
        let mut order = self.order();
        if order.started.contains(&key) {
            drop(order);
            self.send(topics::TASK_EXIT_EVENT_TOPIC, message);
        } else {
            order.held_exits.insert(
                key,
                Envelope {
                    topic: topics::TASK_EXIT_EVENT_TOPIC,
                    message,
                },
            );
        }
    }

    /// The exit of a process that never started (killed or failed in the created state): sent
    /// at once, there is no start to wait for.
    fn exit_unstarted(
        &self,
        container_id: &str,
        exec_id: &str,
        pid: u32,
        exit_status: u32,
        exited_at: Timestamp,
    ) {
        self.started(container_id, exec_id);
        self.exit(container_id, exec_id, pid, exit_status, exited_at);
    }

    fn delete(&self, container_id: &str, pid: u32, exit_status: u32, exited_at: Timestamp) {
        {
            let mut order = self.order();
            order.started.retain(|(c, _)| c != container_id);
            order.held_exits.retain(|(c, _), _| c != container_id);
        }
        self.send(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: container_id.into(),
                id: container_id.into(),
                pid,
                exit_status,
                exited_at: Some(exited_at).into(),
                ..Default::default()
            }),
        );
    }

    /// Forgets an exec's ordering state once it is deleted.
    fn exec_deleted(&self, container_id: &str, exec_id: &str) {
        let key = (container_id.to_string(), exec_id.to_string());
        let mut order = self.order();
        order.started.remove(&key);
        order.held_exits.remove(&key);
    }

    fn oom(&self, container_id: &str) {
        self.send(
            topics::TASK_OOM_EVENT_TOPIC,
            Box::new(TaskOOM {
                container_id: container_id.into(),
                ..Default::default()
            }),
        );
    }

    fn paused(&self, container_id: &str) {
        self.send(
            topics::TASK_PAUSED_EVENT_TOPIC,
            Box::new(TaskPaused {
                container_id: container_id.into(),
                ..Default::default()
            }),
        );
    }

    fn resumed(&self, container_id: &str) {
        self.send(
            topics::TASK_RESUMED_EVENT_TOPIC,
            Box::new(TaskResumed {
                container_id: container_id.into(),
                ..Default::default()
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::process::now;

    fn drain(rx: &mut mpsc::UnboundedReceiver<Envelope>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(env) = rx.try_recv() {
            let msg = &env.message;
            let id = if let Some(e) = msg.downcast_ref::<TaskExit>() {
                format!("{}/{}={}", e.container_id, e.id, e.exit_status)
            } else if let Some(e) = msg.downcast_ref::<TaskExecStarted>() {
                format!("{}/{}", e.container_id, e.exec_id)
            } else if let Some(e) = msg.downcast_ref::<TaskStart>() {
                e.container_id.clone()
            } else if let Some(e) = msg.downcast_ref::<TaskCreate>() {
                e.container_id.clone()
            } else if let Some(e) = msg.downcast_ref::<TaskDelete>() {
                e.container_id.clone()
            } else {
                String::new()
            };
            out.push(format!("{} {id}", env.topic));
        }
        out
    }

    #[test]
    fn exit_before_start_is_held_until_the_start() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let events = Events::with_queue(tx);
        events.create("c1", "/b", &StdioPaths::default(), 7);
        // The guest process exits before the shim publishes its start.
        events.exit("c1", "", 7, 0, now());
        assert_eq!(drain(&mut rx), vec!["/tasks/create c1"]);
        events.start("c1", 7);
        assert_eq!(
            drain(&mut rx),
            vec!["/tasks/start c1", "/tasks/exit c1/c1=0"]
        );
        events.delete("c1", 7, 0, now());
        assert_eq!(drain(&mut rx), vec!["/tasks/delete c1"]);
    }

    #[test]
    fn exec_events_follow_the_exec_lifecycle() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let events = Events::with_queue(tx);
        events.start("c1", 7);
        events.exec_added("c1", "e1");
        events.exit("c1", "e1", 9, 3, now());
        events.exec_started("c1", "e1", 9);
        events.exit("c1", "", 7, 137, now());
        assert_eq!(
            drain(&mut rx),
            vec![
                "/tasks/start c1",
                "/tasks/exec-added ",
                "/tasks/exec-started c1/e1",
                "/tasks/exit c1/e1=3",
                "/tasks/exit c1/c1=137",
            ]
        );
        // An exec id reused after delete starts from scratch.
        events.exec_deleted("c1", "e1");
        events.exit("c1", "e1", 10, 0, now());
        assert!(drain(&mut rx).is_empty());
        events.exec_started("c1", "e1", 10);
        assert_eq!(
            drain(&mut rx),
            vec!["/tasks/exec-started c1/e1", "/tasks/exit c1/e1=0"]
        );
    }

    #[test]
    fn unstarted_exit_goes_out_at_once() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let events = Events::with_queue(tx);
        events.exit_unstarted("c2", "", 0, 137, now());
        assert_eq!(drain(&mut rx), vec!["/tasks/exit c2/c2=137"]);
    }
}
