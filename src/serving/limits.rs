//! Limits that bound what a request may cost before the cost is paid (docs/security.md):
//! per model, derived from its interface; per server, shared by every model and both front
//! doors.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;
use super::pool::DecodePool;
use crate::repository::{InputDatatype, ModelConfig};

/// Bytes of JSON text allowed per tensor value when a model's body limit is derived: a float
/// printed in full (`-0.10000000149011612`, 20 characters) with its separator and some
/// nesting or whitespace.
pub const JSON_BYTES_PER_VALUE: usize = 32;

/// Bytes allowed for everything in a body besides tensor data: the JSON header (id,
/// parameters, inputs' and outputs' descriptions).
pub const ENVELOPE_BYTES: usize = 64 << 10;

/// What one request to a model may hold, derived from the model's interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelLimits {
    /// Batch rows per request (`max_batch_size`).
    pub max_items: usize,
    /// Tensor values per item (C·H·W) the network runs on.
    pub item_values: usize,
    /// Largest encoded image (BYTES inputs).
    pub max_image_bytes: usize,
    /// Largest image in pixels, checked from its header before decoding.
    pub max_image_pixels: u64,
    /// Largest HTTP body or gRPC message.
    pub max_body_bytes: usize,
}

impl ModelLimits {
    /// The limits of `config`: `max_body_bytes` is `max_batch_size` × the item's size on the
    /// wire (4 bytes a value in binary, [`JSON_BYTES_PER_VALUE`] in JSON, or the largest
    /// encoded image plus its length prefix) plus [`ENVELOPE_BYTES`], unless the config sets
    /// its own.
    pub fn from_config(config: &ModelConfig) -> Self {
        let item_values = config.input.dims.iter().map(|&d| d.max(0) as usize).product::<usize>();
        let max_items = config.max_batch_size;
        let (max_image_bytes, max_image_pixels) =
            config.input.image.as_ref().map_or((0, 0), |i| (i.max_bytes, i.max_pixels));
        let item_bytes = match config.input.datatype {
            InputDatatype::Fp32 => item_values.saturating_mul(JSON_BYTES_PER_VALUE.max(4)),
            InputDatatype::Bytes => max_image_bytes.saturating_add(4),
        };
        let derived = max_items.saturating_mul(item_bytes).saturating_add(ENVELOPE_BYTES);
        ModelLimits {
            max_items,
            item_values,
            max_image_bytes,
            max_image_pixels,
            max_body_bytes: config.limits.max_body_bytes.unwrap_or(derived),
        }
    }

    /// The most tensor values one request may carry.
    pub fn max_values(&self) -> usize {
        self.max_items.saturating_mul(self.item_values)
    }
}

/// Server-wide limits (command-line flags), shared by both front doors.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    /// Requests admitted and not yet answered, over every model.
    pub max_inflight_requests: usize,
    /// Request bytes (bodies, messages) held at once, over every request: each request
    /// reserves its bytes as they arrive, before they are buffered.
    pub max_inflight_body_bytes: usize,
    /// Threads that decode request data, images and large responses.
    pub decode_threads: usize,
    /// A body smaller than this is decoded on the async runtime (cheaper than a thread hop).
    pub inline_decode_bytes: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_inflight_requests: 4096,
            max_inflight_body_bytes: 256 << 20,
            decode_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            inline_decode_bytes: 32 << 10,
        }
    }
}

/// The server's shared admission state: a request slot and a share of the body-byte budget.
pub struct Budget {
    limits: ServerLimits,
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    /// CPU-heavy decoding and encoding, off the async runtime.
    decode: DecodePool,
}

/// A server-wide admission: a request slot held from before the body is read until the
/// answer is built, and the body bytes reserved so far.
#[derive(Debug)]
pub struct Reservation {
    _request: OwnedSemaphorePermit,
    bytes: Option<OwnedSemaphorePermit>,
    pool: Arc<Semaphore>,
    budget: usize,
}

impl Reservation {
    /// Reserves `n` more bytes before they are buffered, or refuses at once (429 /
    /// RESOURCE_EXHAUSTED) when the server's byte budget is spent.
    pub fn grow(&mut self, n: usize) -> Result<(), ApiError> {
        if n == 0 {
            return Ok(());
        }
        let exhausted = || {
            ApiError::Busy(format!(
                "the server holds its limit of {} request bytes in flight (--max-inflight-body-bytes); retry later",
                self.budget
            ))
        };
        let n = u32::try_from(n).map_err(|_| exhausted())?;
        let more = self.pool.clone().try_acquire_many_owned(n).map_err(|_| exhausted())?;
        match &mut self.bytes {
            Some(held) => held.merge(more),
            None => self.bytes = Some(more),
        }
        Ok(())
    }

    /// Bytes reserved so far.
    pub fn bytes(&self) -> usize {
        self.bytes.as_ref().map_or(0, |b| b.num_permits())
    }
}

impl Budget {
    pub fn new(limits: ServerLimits) -> Self {
        let byte_permits = limits.max_inflight_body_bytes.min(Semaphore::MAX_PERMITS);
        Budget {
            requests: Arc::new(Semaphore::new(limits.max_inflight_requests.max(1))),
            bytes: Arc::new(Semaphore::new(byte_permits)),
            decode: DecodePool::new(limits.decode_threads, limits.max_inflight_requests)
                .expect("the decode threads start"),
            limits,
        }
    }

    pub fn limits(&self) -> &ServerLimits {
        &self.limits
    }

    /// Takes a request slot and `body_bytes` of the byte budget, or says which is exhausted
    /// (429 / RESOURCE_EXHAUSTED) without waiting.
    pub fn reserve(&self, body_bytes: usize) -> Result<Reservation, ApiError> {
        let request = self.requests.clone().try_acquire_owned().map_err(|_| {
            ApiError::Busy(format!(
                "the server has {} requests in flight (--max-inflight-requests); retry later",
                self.limits.max_inflight_requests
            ))
        })?;
        if body_bytes > self.limits.max_inflight_body_bytes {
            return Err(ApiError::PayloadTooLarge(format!(
                "a request of {body_bytes} bytes exceeds the server's in-flight byte budget of {} \
                 (--max-inflight-body-bytes)",
                self.limits.max_inflight_body_bytes
            )));
        }
        let mut reservation = Reservation {
            _request: request,
            bytes: None,
            pool: self.bytes.clone(),
            budget: self.limits.max_inflight_body_bytes,
        };
        reservation.grow(body_bytes)?;
        Ok(reservation)
    }

    /// Runs `work` on the decode pool (`decode_threads` threads at a lower priority).
    pub async fn decode<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        self.decode.run(work).await
    }

    /// Requests admitted server-wide and not yet answered.
    pub fn inflight(&self) -> usize {
        self.limits.max_inflight_requests.max(1) - self.requests.available_permits()
    }
}

/// A deadline `timeout` from `start`, or none; the earliest of several.
pub fn earliest(
    start: std::time::Instant,
    timeouts: impl IntoIterator<Item = Option<Duration>>,
) -> Option<std::time::Instant> {
    timeouts.into_iter().flatten().filter_map(|t| start.checked_add(t)).min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_bounded_and_released() {
        let budget = Budget::new(ServerLimits {
            max_inflight_requests: 2,
            max_inflight_body_bytes: 100,
            decode_threads: 1,
            inline_decode_bytes: 0,
        });
        let mut a = budget.reserve(0).unwrap();
        a.grow(30).unwrap();
        a.grow(30).unwrap();
        assert_eq!(a.bytes(), 60);
        assert!(
            matches!(budget.reserve(60), Err(ApiError::Busy(m)) if m.contains("max-inflight-body-bytes"))
        );
        let mut b = budget.reserve(40).unwrap();
        assert!(matches!(b.grow(1), Err(ApiError::Busy(_))), "the budget is spent");
        assert!(matches!(budget.reserve(0), Err(ApiError::Busy(m)) if m.contains("max-inflight-requests")));
        assert_eq!(budget.inflight(), 2);
        drop((a, b));
        assert!(matches!(budget.reserve(101), Err(ApiError::PayloadTooLarge(_))));
        assert!(budget.reserve(100).is_ok());
    }

    #[test]
    fn deadlines_take_the_earliest() {
        let t0 = std::time::Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(earliest(t0, [None, Some(ms(5)), Some(ms(3))]), Some(t0 + ms(3)));
        assert_eq!(earliest(t0, [None, None]), None);
    }
}
