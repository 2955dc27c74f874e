//! The HTTP body decoder (`codec::decode_request`: JSON, JSON + binary tensor data, raw
//! binary bodies) against both models, then `prepare` on whatever it accepts.
//!
//! Input layout: `[b0, b1, body...]`. `b0 & 1` picks the model (0: FP32 tensor model,
//! 1: BYTES image model); `(b0 >> 1) & 3` picks the `Inference-Header-Content-Length`:
//! 0 → absent (all JSON), 1 → `Some(0)` (raw body), 2/3 → `Some(n % (len + 1))` with
//! `n = (b0 >> 3) << 8 | b1` (0..8191), so a seed can name its JSON part's exact length.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sluice::protocol::http::codec::decode_request;
use sluice::serving::prepare::prepare;
use sluice_fuzz::models;

fuzz_target!(|data: &[u8]| {
    sluice_fuzz::leave_decoder_panics_to_sluice();
    let [b0, b1, body @ ..] = data else { return };
    let model = &models()[(b0 & 1) as usize];
    let header_length = match (b0 >> 1) & 3 {
        0 => None,
        1 => Some(0),
        _ => Some((((b0 >> 3) as usize) << 8 | *b1 as usize) % (body.len() + 1)),
    };
    let Ok(mut req) = decode_request(Bytes::copy_from_slice(body), header_length, model) else { return };
    assert!(req.inputs.len() <= 1, "the model takes one input; decoded {}", req.inputs.len());
    if let Ok(prepared) = prepare(&mut req, model) {
        let [c, h, w] = model.dims;
        assert!(prepared.items >= 1 && prepared.items <= model.max_batch_size, "items {}", prepared.items);
        assert_eq!(prepared.values.len(), prepared.items * (c * h * w) as usize);
        assert!(!prepared.outputs.is_empty());
    }
});
