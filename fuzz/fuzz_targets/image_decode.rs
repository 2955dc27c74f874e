//! Server-side image decoding (`serving::image::decode`: PNG/JPEG → grayscale or RGB,
//! resized to 28×28, normalised), with a 1-megapixel limit so decompression bombs are
//! refused from the header. Input layout: `[b0, image...]`; `b0 & 1` picks 1 or 3 channels.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::repository::ImageConfig;
use sluice::serving::image::{ImageRefusal, decode};

fuzz_target!(|data: &[u8]| {
    sluice_fuzz::leave_decoder_panics_to_sluice();
    let [b0, bytes @ ..] = data else { return };
    let channels = if b0 & 1 == 0 { 1 } else { 3 };
    let mut config = ImageConfig::new(vec![0.286; channels], vec![0.353; channels]);
    config.max_pixels = 1 << 20;
    match decode(bytes, channels, 28, 28, &config) {
        Ok(values) => {
            assert_eq!(values.len(), channels * 28 * 28);
            assert!(values.iter().all(|v| v.is_finite()));
        }
        Err(ImageRefusal::TooLarge(m) | ImageRefusal::Invalid(m)) => assert!(!m.is_empty()),
    }
});
