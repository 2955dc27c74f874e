//! The gRPC inference request path: the bytes as a protobuf `ModelInferRequest` (skipped
//! when prost refuses them), `convert::request` against both models, then `prepare` on
//! whatever it accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use sluice::protocol::grpc::convert;
use sluice::protocol::grpc::pb::ModelInferRequest;
use sluice::serving::prepare::prepare;
use sluice_fuzz::models;

fuzz_target!(|data: &[u8]| {
    sluice_fuzz::leave_decoder_panics_to_sluice();
    let Ok(msg) = ModelInferRequest::decode(data) else { return };
    for model in models() {
        let Ok(mut req) = convert::request(msg.clone(), model) else { continue };
        assert!(req.inputs.len() <= 1, "the model takes one input; converted {}", req.inputs.len());
        if let Ok(prepared) = prepare(&mut req, model) {
            let [c, h, w] = model.dims;
            assert!(prepared.items >= 1 && prepared.items <= model.max_batch_size);
            assert_eq!(prepared.values.len(), prepared.items * (c * h * w) as usize);
        }
    }
});
