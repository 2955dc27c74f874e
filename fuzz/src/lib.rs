//! What every fuzz target shares: the fixed model interfaces requests are decoded against
//! (the shipped Fashion-MNIST models: an FP32 `[N, 1, 28, 28]` tensor model and its BYTES
//! image twin, max_batch_size 32).

use sluice::repository::ImageConfig;
use sluice::serving::DataType;
use sluice::serving::limits::ModelLimits;
use sluice::serving::prepare::ModelInterface;

pub const LABELS: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

fn limits() -> ModelLimits {
    ModelLimits {
        max_items: 32,
        item_values: 784,
        max_image_bytes: 256 << 10,
        max_image_pixels: 2048 * 2048,
        // ModelLimits::from_config would derive ~866 KiB for the tensor model.
        max_body_bytes: 1 << 20,
    }
}

/// The tensor model: input `input`, FP32 `[N, 1, 28, 28]`.
pub fn fp32_model() -> ModelInterface {
    ModelInterface {
        name: "fashion-resnet20".into(),
        version: "1".into(),
        input_name: "input".into(),
        input_datatype: DataType::Fp32,
        dims: [1, 28, 28],
        image: None,
        output_name: "logits".into(),
        labels: LABELS.iter().map(|s| s.to_string()).collect(),
        max_batch_size: 32,
        limits: limits(),
    }
}

/// The image model: input `image`, BYTES `[N, 1]` (PNG/JPEG), decoded to `[1, 28, 28]`.
pub fn image_model() -> ModelInterface {
    ModelInterface {
        name: "fashion-resnet20-image".into(),
        input_name: "image".into(),
        input_datatype: DataType::Bytes,
        image: Some(ImageConfig::new(vec![0.286], vec![0.353])),
        ..fp32_model()
    }
}

/// Both models, built once per process.
pub fn models() -> &'static [ModelInterface; 2] {
    static MODELS: std::sync::OnceLock<[ModelInterface; 2]> = std::sync::OnceLock::new();
    MODELS.get_or_init(|| [fp32_model(), image_model()])
}

/// `serving::image::decode` catches panics inside the image decoders (third-party code;
/// fuzzing found some, fuzz/RESULTS.md) and answers them as undecodable images. libFuzzer's
/// panic hook would abort on them before that `catch_unwind` runs, so targets that decode
/// images call this first: a panic whose location is in the `png`, `zune-jpeg`/`zune-core`
/// or `image` crates is left to unwind into sluice's handler; every other panic aborts as
/// before.
pub fn leave_decoder_panics_to_sluice() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let abort_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let file = info.location().map(|l| l.file()).unwrap_or("");
            let in_decoder = ["/png-", "/zune-jpeg-", "/zune-core-", "/image-0."].iter().any(|c| file.contains(c));
            if !in_decoder {
                abort_hook(info);
            }
        }));
    });
}
