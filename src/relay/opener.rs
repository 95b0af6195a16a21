//! What a File or Forward request needs from the relay to open its own stream: the
//! connection, the sandbox credentials, and a way to refuse on the control stream when
//! no stream can be opened at all (`ChannelFailed`).

use std::sync::Arc;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use super::{send_bounded, EVENT_SEND_LIMIT};
use crate::identity::SandboxCredentials;
use crate::proto::{self, supervisor_message, SupervisorMessage};
use crate::telemetry::Telemetry;

#[derive(Clone)]
pub struct Opener {
    pub channel: Channel,
    pub creds: SandboxCredentials,
    pub telemetry: Arc<Telemetry>,
    control: mpsc::Sender<SupervisorMessage>,
}

impl Opener {
    pub(crate) fn new(
        channel: Channel,
        creds: SandboxCredentials,
        telemetry: Arc<Telemetry>,
        control: mpsc::Sender<SupervisorMessage>,
    ) -> Self {
        Opener {
            channel,
            creds,
            telemetry,
            control,
        }
    }

    /// Answers request `id` with `ChannelFailed` on the control stream (best effort,
    /// bounded: a stalled control stream is the relay loop's to notice).
    pub async fn refuse(&self, id: &str, code: proto::ErrorCode, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(event = "channel.refused", id, code = ?code, error = %message, "file or forward request refused");
        let _ = send_bounded(
            &self.control,
            channel_failed(id, code, message),
            EVENT_SEND_LIMIT,
        )
        .await;
    }
}

pub(crate) fn channel_failed(
    id: &str,
    code: proto::ErrorCode,
    message: String,
) -> SupervisorMessage {
    SupervisorMessage {
        msg: Some(supervisor_message::Msg::ChannelFailed(
            proto::ChannelFailed {
                id: id.to_owned(),
                error: Some(proto::Error {
                    code: code as i32,
                    message,
                }),
            },
        )),
    }
}
