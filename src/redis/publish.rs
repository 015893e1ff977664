//! Publishing: one script call per batch (split every [`CHUNK`] messages), atomic with dedupe.

use chrono::Utc;
use uuid::Uuid;

use super::{array, bad_reply, int, script_error, text, RedisBackend};
use crate::error::Result;
use crate::names::validate_name;
use crate::queue::{OutgoingMessage, PublishReceipt};

/// Messages per script call: each call is atomic and keeps the server busy for one batch only.
const CHUNK: usize = 500;

/// Milliseconds, rounded up so that a delay is never shortened.
fn ceil_ms(d: std::time::Duration) -> u128 {
    d.as_nanos().div_ceil(1_000_000)
}

/// When the message is due, as the script expects it: '' now, '+ms' relative, '=ms' Unix time.
fn due(m: &OutgoingMessage) -> String {
    match (m.deliver_at, m.delay) {
        (Some(at), _) if at > Utc::now() => format!("={}", at.timestamp_millis()),
        (None, Some(d)) if !d.is_zero() => format!("+{}", ceil_ms(d)),
        _ => String::new(),
    }
}

pub(super) async fn publish(
    b: &RedisBackend,
    stream: &str,
    msgs: &[OutgoingMessage],
) -> Result<Vec<PublishReceipt>> {
    validate_name("stream", stream)?;
    let keys = b.keys(stream);
    let mut receipts = Vec::with_capacity(msgs.len());
    let mut conn = b.conn();
    for chunk in msgs.chunks(CHUNK) {
        let mut call = b.inner.scripts.publish.prepare_invoke();
        call.key(&keys.meta)
            .key(&keys.log)
            .key(&keys.delayed)
            .key(&keys.wake);
        let mut next_key = 5;
        for m in chunk {
            let headers = if m.headers.is_empty() {
                String::new()
            } else {
                serde_json::to_string(&m.headers)?
            };
            let dedupe_index = match &m.dedupe_key {
                Some(k) => {
                    call.key(keys.dedupe(k));
                    next_key += 1;
                    next_key - 1
                }
                None => 0,
            };
            call.arg(Uuid::now_v7().to_string())
                .arg(m.payload.as_ref())
                .arg(if m.is_json { "1" } else { "0" })
                .arg(headers)
                .arg(dedupe_index)
                .arg(due(m));
        }
        let reply: redis::Value = call
            .invoke_async(&mut conn)
            .await
            .map_err(|e| script_error(e, stream, None))?;
        for r in array(reply)? {
            let mut r = array(r)?.into_iter();
            let (Some(id), Some(dup)) = (r.next(), r.next()) else {
                return Err(bad_reply("publish receipt"));
            };
            receipts.push(PublishReceipt {
                id: text(id)?
                    .parse()
                    .map_err(|_| bad_reply("message id is not a UUID"))?,
                duplicate: int(&dup)? == 1,
            });
        }
    }
    if receipts.len() != msgs.len() {
        return Err(bad_reply("one receipt per message"));
    }
    Ok(receipts)
}
