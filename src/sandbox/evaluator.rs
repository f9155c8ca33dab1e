//! Threads that run alert conditions for the sandbox's request handlers.
//!
//! The JavaScript engine is not `Send` and a condition may spin until its time limit, so
//! conditions run on a few dedicated threads, never on the async runtime. A thing always
//! lands on the same thread (a lane), which keeps its dweets evaluated in order.
//!
//! The engine checks its deadline only between bytecode steps, and only every few thousand of
//! them, so a loop of expensive built-in calls (`new Array(1e6).join()`) can overrun the time
//! limit by far. The request is not held hostage to that: past twice the limit it is answered,
//! the lane gets a fresh thread, and the stuck one is left to end on its own (its memory is
//! capped, and it drops the jobs queued behind it). The caller is told the condition was
//! abandoned, so the sandbox stops running it until the alert is set anew.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::alert::condition::{ConditionEngine, ConditionError, EvaluationLimits, Verdict};

/// Evaluations that may wait per lane; past it, dweets to alerted things wait their turn.
const QUEUE: usize = 1024;

struct Job {
    condition: Arc<str>,
    content_json: String,
    reply: oneshot::Sender<Result<Verdict, ConditionError>>,
}

/// One evaluation thread: where to send it work, and how to tell it to drop that work.
#[derive(Clone)]
struct Lane {
    jobs: mpsc::Sender<Job>,
    abandoned: Arc<AtomicBool>,
}

impl Lane {
    fn spawn(index: usize, limits: EvaluationLimits) -> std::io::Result<Self> {
        let (jobs, receiver) = mpsc::channel(QUEUE);
        let abandoned = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&abandoned);
        std::thread::Builder::new()
            .name(format!("alert-eval-{index}"))
            .spawn(move || evaluate_forever(receiver, limits, flag))?;
        Ok(Lane { jobs, abandoned })
    }
}

/// Why an evaluation gave no verdict: the condition's own failure, or a lane given up on.
#[derive(Debug)]
pub(super) enum NoVerdict {
    Condition(ConditionError),
    /// The condition ran far past its time limit and its thread was replaced; `culprit` is
    /// true for the evaluation that was running then (the ones queued behind it only waited).
    Abandoned {
        culprit: bool,
        waited: Duration,
    },
}

/// The evaluation lanes; their threads end when this is dropped.
pub(super) struct Evaluator {
    lanes: Vec<Mutex<Lane>>,
    limits: EvaluationLimits,
    hasher: RandomState,
}

impl Evaluator {
    pub(super) fn start(threads: usize, limits: EvaluationLimits) -> std::io::Result<Self> {
        let lanes = (0..threads.max(1))
            .map(|index| Lane::spawn(index, limits).map(Mutex::new))
            .collect::<std::io::Result<_>>()?;
        Ok(Evaluator {
            lanes,
            limits,
            hasher: RandomState::new(),
        })
    }

    pub(super) async fn evaluate(
        &self,
        thing: &str,
        condition: Arc<str>,
        content_json: String,
    ) -> Result<Verdict, NoVerdict> {
        let index = (self.hasher.hash_one(thing) as usize) % self.lanes.len();
        let lane = self.lane(index).clone();
        let (reply, answer) = oneshot::channel();
        let job = Job {
            condition,
            content_json,
            reply,
        };
        let gone = || {
            NoVerdict::Condition(ConditionError::Engine(
                "the evaluation thread has stopped".to_owned(),
            ))
        };
        let patience = self.limits.time * 2 + Duration::from_millis(100);
        let outcome = tokio::time::timeout(patience, async {
            lane.jobs.send(job).await.map_err(|_| gone())?;
            answer.await.map_err(|_| gone())
        })
        .await;
        match outcome {
            Ok(Ok(result)) => result.map_err(NoVerdict::Condition),
            Ok(Err(no_verdict)) => Err(no_verdict),
            Err(_elapsed) => Err(NoVerdict::Abandoned {
                culprit: self.replace_lane(index, &lane),
                waited: patience,
            }),
        }
    }

    fn lane(&self, index: usize) -> std::sync::MutexGuard<'_, Lane> {
        self.lanes[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Gives `stuck` a successor unless another caller already did; true if this call did.
    fn replace_lane(&self, index: usize, stuck: &Lane) -> bool {
        let mut lane = self.lane(index);
        if !lane.jobs.same_channel(&stuck.jobs) {
            return false;
        }
        match Lane::spawn(index, self.limits) {
            Ok(fresh) => {
                stuck.abandoned.store(true, Ordering::Relaxed);
                *lane = fresh;
                true
            }
            Err(error) => {
                tracing::error!(%error, "could not start a new alert evaluation thread");
                false
            }
        }
    }
}

fn evaluate_forever(
    mut jobs: mpsc::Receiver<Job>,
    limits: EvaluationLimits,
    abandoned: Arc<AtomicBool>,
) {
    let mut engine = ConditionEngine::new(limits);
    while let Some(job) = jobs.blocking_recv() {
        if abandoned.load(Ordering::Relaxed) {
            // A successor serves this lane; whoever queued here has been answered already.
            return;
        }
        let result = match engine.as_mut() {
            Ok(engine) => engine.evaluate(&job.condition, &job.content_json),
            Err(error) => Err(error.clone()),
        };
        // The requester may have gone (its connection closed); nothing to tell then.
        let _ = job.reply.send(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_condition_that_overruns_far_is_abandoned_and_the_lane_goes_on() {
        let evaluator = Evaluator::start(
            1,
            EvaluationLimits {
                time: Duration::from_millis(20),
                ..EvaluationLimits::default()
            },
        )
        .unwrap();
        // Built-in calls between deadline checks: the engine cannot stop this in time.
        let stuck = evaluator
            .evaluate(
                "t",
                "while(true) { new Array(2000000).join('x'); }".into(),
                "{}".to_owned(),
            )
            .await;
        assert!(
            matches!(stuck, Err(NoVerdict::Abandoned { culprit: true, .. })),
            "{stuck:?}"
        );
        let next = evaluator
            .evaluate("t", "return 'fresh thread';".into(), "{}".to_owned())
            .await;
        assert_eq!(
            next.unwrap(),
            Verdict::Fired {
                message: "fresh thread".to_owned()
            }
        );
    }
}
