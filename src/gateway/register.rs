//! Register (park, push the activation, re-deliver, resume) and IssueSandboxToken.

use super::issuer::unix_now;
use super::server::{boxed, reg, BoxStream, GatewayService};
use super::state::{PodEntry, Shared, State, Stop, StopReason, StreamLink};
use super::tokens::PodIdentity;
use crate::proto;
use crate::proto::register_event::Event as RegEvent;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::Status;

/// What Register decided, computed under the state lock.
pub(crate) enum RegisterPlan {
    Events(Vec<proto::RegisterEvent>),
    Park,
}

/// IssueSandboxToken under the state lock.
pub(crate) fn issue_locked(
    shared: &Shared,
    st: &mut State,
    ident: &PodIdentity,
    req: &proto::IssueSandboxTokenRequest,
) -> Result<proto::Activation, Status> {
    if let Some(pod) = &req.pod {
        if !pod.uid.is_empty() && pod.uid != ident.pod_uid {
            return Err(Status::permission_denied(format!(
                "request names pod uid {} but the projected token is for pod {} uid {}",
                pod.uid, ident.pod_name, ident.pod_uid
            )));
        }
    }
    let sandbox_id = st
        .pods
        .get(&ident.pod_name)
        .filter(|p| p.uid == ident.pod_uid)
        .and_then(|p| p.sandbox_id.clone());
    let Some(sb) = sandbox_id.and_then(|id| st.sandboxes.get_mut(&id)) else {
        return Err(Status::failed_precondition(format!(
            "pod {} is not claimed yet; wait for the Register push or the claim annotation",
            ident.pod_name
        )));
    };
    if let Some(resume) = &req.resume {
        if !resume.claim_uid.is_empty() && resume.claim_uid != sb.claim_uid {
            return Err(Status::permission_denied(format!(
                "resume names claim {} but pod {} is bound to claim {}; refuse the binding",
                resume.claim_uid, ident.pod_name, sb.claim_uid
            )));
        }
    }
    if let Some(why) = sb.gone_reason() {
        return Err(Status::permission_denied(format!(
            "{why}; release the sandbox"
        )));
    }
    shared.activation(sb)
}

impl GatewayService {
    /// Decides what a valid Register gets: an immediate answer, or parking.
    pub(crate) fn plan_register(
        &self,
        ident: &PodIdentity,
        req: &proto::RegisterRequest,
    ) -> Result<RegisterPlan, String> {
        let shared = &self.shared;
        let mut st = shared.lock();
        st.stats_mut(&ident.pod_name).register_attempts += 1;
        let result = plan_register_locked(shared, &mut st, ident, req);
        if result.is_err() {
            st.stats_mut(&ident.pod_name).rejected += 1;
        }
        if let Ok(RegisterPlan::Events(ev)) = &result {
            if ev
                .iter()
                .any(|e| matches!(e.event, Some(RegEvent::Activation(_))))
            {
                st.stats_mut(&ident.pod_name).activations_pushed += 1;
            }
        }
        result
    }

    /// Parks the pod: `Parked`, heartbeats, then the activation (pushed by `claim`) or a
    /// clean end when the token nears expiry.
    pub(crate) fn park(
        &self,
        ident: &PodIdentity,
        req: &proto::RegisterRequest,
    ) -> BoxStream<proto::RegisterEvent> {
        let shared = Arc::clone(&self.shared);
        let hb = shared.cfg.heartbeat_interval;
        let (tx, rx) = mpsc::channel(16);
        // A fresh channel: Parked is queued before anyone else can see the link.
        let _ = tx.try_send(Ok(reg(RegEvent::Parked(proto::Parked {
            heartbeat_interval_ms: hb.as_millis() as u32,
        }))));
        let gen = shared.next_gen();
        let stop = Stop::new();
        {
            let mut st = shared.lock();
            let pod = st
                .pods
                .entry(ident.pod_name.clone())
                .or_insert_with(|| PodEntry {
                    namespace: ident.namespace.clone(),
                    name: ident.pod_name.clone(),
                    uid: ident.pod_uid.clone(),
                    instance_id: String::new(),
                    seed: None,
                    parked: None,
                    sandbox_id: None,
                    released: false,
                });
            pod.instance_id = req.instance_id.clone();
            pod.seed = req.seed.clone();
            // The supervisor re-registered: its older parked stream is dead or superseded.
            if let Some(old) = pod.parked.replace(StreamLink {
                gen,
                tx: tx.clone(),
                stop: stop.clone(),
            }) {
                old.end(StopReason::Clean);
            }
            st.stats_mut(&ident.pod_name).parked += 1;
        }
        tracing::info!(event = "gateway.register.parked", pod = %ident.pod_name, instance_id = %req.instance_id, "pod parked");

        // End before the shown token expires, but never sooner than half its remaining life.
        let remaining = (ident.token_exp - unix_now()).max(0) as u64;
        let margin = shared.cfg.park_expiry_margin.as_secs().min(remaining / 2);
        let park_for = Duration::from_secs(remaining.saturating_sub(margin).max(1));
        let pod_name = ident.pod_name.clone();
        tokio::spawn(async move {
            let mut stopped = stop.listener();
            let deadline = tokio::time::sleep(park_for);
            tokio::pin!(deadline);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + hb, hb);
            let expired = loop {
                tokio::select! {
                    reason = stopped.fired() => {
                        if let StopReason::Fail(s) = reason { let _ = tx.send(Err(s)).await; }
                        break false;
                    }
                    _ = &mut deadline => break true,
                    _ = tx.closed() => break false,
                    _ = tick.tick() => { let _ = tx.try_send(Ok(reg(RegEvent::Heartbeat(proto::Heartbeat {})))); }
                }
            };
            {
                let mut st = shared.lock();
                if let Some(pod) = st.pods.get_mut(&pod_name) {
                    if pod.parked.as_ref().map(|l| l.gen) == Some(gen) {
                        pod.parked = None;
                    }
                }
                if expired {
                    st.stats_mut(&pod_name).park_expired += 1;
                }
            }
            if expired {
                tracing::info!(event = "gateway.register.park_expired", pod = %pod_name, "ending parked stream: the projected token it was shown nears expiry");
            }
            shared.bump();
        });
        boxed(rx)
    }
}

fn plan_register_locked(
    shared: &Shared,
    st: &mut State,
    ident: &PodIdentity,
    req: &proto::RegisterRequest,
) -> Result<RegisterPlan, String> {
    if let Some(pod) = &req.pod {
        if !pod.uid.is_empty() && pod.uid != ident.pod_uid {
            return Err(format!(
                "pod uid mismatch: the supervisor says {} but the projected token is for pod {}/{} uid {}; check the downward-API pod uid",
                pod.uid, ident.namespace, ident.pod_name, ident.pod_uid
            ));
        }
        if !pod.name.is_empty() && pod.name != ident.pod_name {
            return Err(format!(
                "pod name mismatch: the supervisor says {} but the projected token is for pod {}",
                pod.name, ident.pod_name
            ));
        }
    }
    // Same name, new uid: a new pod took the name; forget the old one's binding.
    if let Some(pod) = st.pods.get_mut(&ident.pod_name) {
        if pod.uid != ident.pod_uid {
            if let Some(old) = pod.parked.take() {
                old.end(StopReason::Clean);
            }
            st.pods.remove(&ident.pod_name);
        }
    }
    let pod = st.pods.get(&ident.pod_name);
    if pod.is_some_and(|p| p.released) && req.resume.is_none() {
        return Err(format!(
            "pod {} was released and is never reused; the pod should be deleted",
            ident.pod_name
        ));
    }
    let current = pod.and_then(|p| p.sandbox_id.clone());
    match (current, &req.resume) {
        (None, None) => Ok(RegisterPlan::Park),
        (None, Some(resume)) => Err(format!(
            "resume names claim {} but pod {} has no binding at this gateway; the claim is gone, release",
            resume.claim_uid, ident.pod_name
        )),
        (Some(id), resume) => {
            let sb = st
                .sandboxes
                .get(&id)
                .ok_or_else(|| format!("internal: pod {} names unknown sandbox {id}", ident.pod_name))?;
            if let Some(why) = sb.gone_reason() {
                return Err(format!("{why}; release and do not register again"));
            }
            match resume {
                Some(r) if r.claim_uid == sb.claim_uid => {}
                Some(r) => {
                    return Err(format!(
                        "resume names claim {} but pod {} is bound to claim {}",
                        r.claim_uid, ident.pod_name, sb.claim_uid
                    ))
                }
                // Not yet confirmed: the earlier activation may never have arrived.
                None if !sb.confirmed => {}
                None => {
                    return Err(format!(
                        "pod is already bound to claim {} (sandbox {}); a bound supervisor must register with `resume`",
                        sb.claim_uid, sb.id
                    ))
                }
            }
            let activation = shared.activation(sb).map_err(|s| s.message().to_owned())?;
            Ok(RegisterPlan::Events(vec![reg(RegEvent::Activation(activation))]))
        }
    }
}
