//! Property tests over the request decoders (the fuzz targets in fuzz/ run the same code for
//! millions of inputs; these run in every `make test`): arbitrary bytes never panic, valid
//! requests round-trip exactly, and no decoder returns more data than the shape declares.

use bytes::Bytes;
use proptest::prelude::*;
use prost::Message;
use sluice::protocol::grpc::{convert, pb};
use sluice::protocol::http::codec::decode_request;
use sluice::repository::ImageConfig;
use sluice::serving::limits::ModelLimits;
use sluice::serving::prepare::{ModelInterface, prepare, split_length_prefixed};
use sluice::serving::{DataType, InputData};

fn model(datatype: DataType) -> ModelInterface {
    ModelInterface {
        name: "m".into(),
        version: "1".into(),
        input_name: "input".into(),
        input_datatype: datatype,
        dims: [1, 1, 2],
        image: (datatype == DataType::Bytes).then(|| ImageConfig::new(vec![0.5], vec![0.5])),
        output_name: "logits".into(),
        labels: vec!["a".into(), "b".into()],
        max_batch_size: 4,
        limits: ModelLimits {
            max_items: 4,
            item_values: 2,
            max_image_bytes: 1 << 16,
            max_image_pixels: 1 << 12,
            max_body_bytes: 1 << 20,
        },
    }
}

fn json_body(shape: &[i64], values: &[f32], nested: bool) -> String {
    let data = if nested {
        serde_json::to_string(&values.chunks(2).map(|c| c.to_vec()).collect::<Vec<_>>()).unwrap()
    } else {
        serde_json::to_string(values).unwrap()
    };
    format!(r#"{{"id":"r","inputs":[{{"name":"input","datatype":"FP32","shape":{shape:?},"data":{data}}}]}}"#)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn http_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512), header in any::<Option<u16>>(), bytes_model in any::<bool>()) {
        let model = model(if bytes_model { DataType::Bytes } else { DataType::Fp32 });
        if let Ok(mut req) = decode_request(Bytes::from(body), header.map(usize::from), &model) {
            let _ = prepare(&mut req, &model);
        }
    }

    #[test]
    fn json_tensors_round_trip_exactly(items in 1usize..=4, seed in proptest::collection::vec(-1e6f32..1e6, 8), nested in any::<bool>()) {
        let model = model(DataType::Fp32);
        let values = &seed[..items * 2];
        let body = json_body(&[items as i64, 1, 1, 2], values, nested);
        let mut req = decode_request(Bytes::from(body), None, &model).unwrap();
        let prepared = prepare(&mut req, &model).unwrap();
        prop_assert_eq!(prepared.items, items);
        prop_assert_eq!(&prepared.values[..], values);
    }

    #[test]
    fn json_data_that_disagrees_with_its_shape_is_refused(items in 1usize..=4, count in 0usize..12) {
        prop_assume!(count != items * 2);
        let model = model(DataType::Fp32);
        let body = json_body(&[items as i64, 1, 1, 2], &vec![0.5; count], false);
        let refused = decode_request(Bytes::from(body), None, &model).and_then(|mut r| prepare(&mut r, &model));
        prop_assert!(refused.is_err());
    }

    #[test]
    fn length_prefixed_elements_split_back(parts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..20), 0..6)) {
        let mut raw = Vec::new();
        for p in &parts {
            raw.extend((p.len() as u32).to_le_bytes());
            raw.extend(p);
        }
        let split = split_length_prefixed(&raw, parts.len()).unwrap();
        prop_assert_eq!(split, parts.iter().map(Vec::as_slice).collect::<Vec<_>>());
        if !parts.is_empty() {
            prop_assert!(split_length_prefixed(&raw, parts.len() - 1).is_err());
        }
    }

    #[test]
    fn length_prefixed_garbage_never_overreads(raw in proptest::collection::vec(any::<u8>(), 0..64), max in 0usize..8) {
        if let Ok(parts) = split_length_prefixed(&raw, max) {
            prop_assert!(parts.len() <= max);
            prop_assert_eq!(parts.iter().map(|p| p.len() + 4).sum::<usize>(), raw.len());
        }
    }

    #[test]
    fn grpc_messages_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let model = model(DataType::Fp32);
        if let Ok(msg) = pb::ModelInferRequest::decode(bytes.as_slice())
            && let Ok(mut req) = convert::request(msg, &model)
        {
            let _ = prepare(&mut req, &model);
        }
    }

    #[test]
    fn grpc_typed_contents_are_moved_not_widened(items in 1usize..=4, values in proptest::collection::vec(any::<f32>(), 8), ints in proptest::collection::vec(any::<i32>(), 1..8)) {
        let model = model(DataType::Fp32);
        let tensor = |contents| pb::model_infer_request::InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![items as i64, 1, 1, 2],
            contents: Some(contents),
            ..Default::default()
        };
        let msg = pb::ModelInferRequest {
            inputs: vec![tensor(pb::InferTensorContents { fp32_contents: values[..items * 2].to_vec(), ..Default::default() })],
            ..Default::default()
        };
        let req = convert::request(msg, &model).unwrap();
        prop_assert!(matches!(&req.inputs[0].data, InputData::F32(v) if v.iter().zip(&values).all(|(a, b)| a.to_bits() == b.to_bits())));
        let msg = pb::ModelInferRequest {
            inputs: vec![tensor(pb::InferTensorContents { int_contents: ints, ..Default::default() })],
            ..Default::default()
        };
        let refused = convert::request(msg, &model).unwrap_err().to_string();
        prop_assert!(refused.contains("int_contents given for a FP32 tensor"), "{}", refused);
    }

    #[test]
    fn image_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256), png_header in any::<bool>()) {
        let mut data = if png_header { b"\x89PNG\r\n\x1a\n".to_vec() } else { Vec::new() };
        data.extend(bytes);
        let _ = sluice::serving::image::decode(&data, 1, 28, 28, &ImageConfig::new(vec![0.5], vec![0.5]));
    }
}
