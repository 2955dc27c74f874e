//! Server-side image pre-processing for `BYTES` image inputs: decode PNG or JPEG, convert
//! to the model's channels, resize to its input size, scale to [0, 1] and normalise per
//! channel — as the model was trained.

use image::imageops::FilterType;

use crate::repository::ImageConfig;

/// Why an image was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRefusal {
    /// Over `max_bytes` or `max_pixels` (found before decoding).
    TooLarge(String),
    /// Not a PNG or JPEG, or broken.
    Invalid(String),
}

impl std::fmt::Display for ImageRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageRefusal::TooLarge(m) | ImageRefusal::Invalid(m) => f.write_str(m),
        }
    }
}

thread_local! {
    static IN_GUARDED_DECODER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks this thread as running a third-party decoder whose panics [`decode`] catches and
/// answers as an invalid image, until dropped.
struct GuardedDecoder;

impl GuardedDecoder {
    fn enter() -> Self {
        IN_GUARDED_DECODER.with(|f| f.set(true));
        GuardedDecoder
    }
}

impl Drop for GuardedDecoder {
    fn drop(&mut self) {
        IN_GUARDED_DECODER.with(|f| f.set(false));
    }
}

/// Whether the current thread is inside an image decoder whose panics are caught and
/// answered as a 400: a panic hook should not report those as the server's own (a client
/// could otherwise fill the error log with one bad image per request).
pub fn in_guarded_decoder() -> bool {
    IN_GUARDED_DECODER.with(std::cell::Cell::get)
}

/// Decodes one encoded image into `channels × height × width` normalised values, or says
/// why it cannot. Size limits are checked from the byte count and the header before a pixel
/// is decoded.
pub fn decode(
    bytes: &[u8],
    channels: usize,
    height: u32,
    width: u32,
    config: &ImageConfig,
) -> Result<Vec<f32>, ImageRefusal> {
    if bytes.len() > config.max_bytes {
        return Err(ImageRefusal::TooLarge(format!(
            "{} bytes of encoded image; this model accepts at most {} (input.image.max_bytes)",
            bytes.len(),
            config.max_bytes
        )));
    }
    let invalid = |m: String| ImageRefusal::Invalid(m);
    let format = image::guess_format(bytes).map_err(|_| invalid("not a PNG or JPEG image".to_string()))?;
    if !matches!(format, image::ImageFormat::Png | image::ImageFormat::Jpeg) {
        return Err(invalid(format!("{format:?} images are not accepted (PNG or JPEG)")));
    }
    // The header says how large the image is; refuse before a pixel is decoded.
    let reader = || image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let (w, h) =
        reader().into_dimensions().map_err(|e| invalid(format!("cannot read the image header: {e}")))?;
    let pixels = u64::from(w) * u64::from(h);
    if pixels > config.max_pixels {
        return Err(ImageRefusal::TooLarge(format!(
            "the image is {w}×{h} = {pixels} pixels; this model accepts at most {} (input.image.max_pixels)",
            config.max_pixels
        )));
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    // Decoded pixels (at most 16 bits × 4 channels) plus the decoder's own buffers.
    limits.max_alloc = Some(pixels.saturating_mul(8).saturating_add(1 << 20));
    let mut reader = reader();
    reader.limits(limits);
    // The decoders are third-party code fed hostile bytes, and fuzzing found inputs that
    // make them panic (png 0.18.1: a palette whose length is not a multiple of 3; fuzz/
    // RESULTS.md). A panic there is this image's failure, answered like any undecodable
    // image; it must not fail the request with a 500 or reach the thread's pool.
    let decoded = {
        let _quiet = GuardedDecoder::enter();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reader.decode()))
    }
    .map_err(|panic| {
        invalid(format!("cannot decode image: the decoder failed on it ({})", panic_text(&panic)))
    })?;
    let img = decoded.map_err(|e| invalid(format!("cannot decode image: {e}")))?;
    let img = resize(img, width, height);
    let pixels: Vec<u8> = match channels {
        1 => img.to_luma8().into_raw(),
        _ => img.to_rgb8().into_raw(),
    };
    let plane = (height * width) as usize;
    let mut out = vec![0f32; channels * plane];
    for (i, &p) in pixels.iter().enumerate() {
        let (pos, c) = (i / channels, i % channels);
        out[c * plane + pos] = ((p as f64 / 255.0 - config.mean[c]) / config.std[c]) as f32;
    }
    Ok(out)
}

/// A panic's message, when it has one.
fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("panic")
}

/// Resizes to `width × height`. A filtered resize costs time in proportion to the source
/// pixels times the filter's support, which grows with the scale factor: a 500-byte JPEG of
/// 65 307 × 28 pixels took 43 ms to bring to 28 × 28 (1.2 ms to decode). So an image more
/// than twice the target in a dimension is first reduced by area averaging (each source
/// pixel added to exactly one intermediate pixel: linear time, and anti-aliased) to at most
/// twice the target, and the triangle filter finishes from there (docs/decisions.md).
fn resize(img: image::DynamicImage, width: u32, height: u32) -> image::DynamicImage {
    if img.width() == width && img.height() == height {
        return img;
    }
    let (w, h) = (img.width().min(2 * width), img.height().min(2 * height));
    let img = if (w, h) != (img.width(), img.height()) { img.thumbnail_exact(w, h) } else { img };
    img.resize_exact(width, height, FilterType::Triangle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32, value: u8) -> Vec<u8> {
        let img = image::GrayImage::from_pixel(w, h, image::Luma([value]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn decodes_resizes_and_normalises() {
        let cfg = ImageConfig::new(vec![0.5], vec![0.5]);
        let v = decode(&png(56, 56, 255), 1, 28, 28, &cfg).unwrap();
        assert_eq!(v.len(), 784);
        assert!(v.iter().all(|&x| (x - 1.0).abs() < 1e-6));
        let rgb = decode(&png(28, 28, 0), 3, 28, 28, &ImageConfig::new(vec![0.0; 3], vec![1.0; 3])).unwrap();
        assert_eq!(rgb.len(), 3 * 784);
    }

    #[test]
    fn refuses_large_images_before_decoding() {
        let mut cfg = ImageConfig::new(vec![0.0], vec![1.0]);
        cfg.max_pixels = 100 * 100;
        assert!(decode(&png(100, 100, 3), 1, 28, 28, &cfg).is_ok());
        let err = decode(&png(101, 100, 3), 1, 28, 28, &cfg).unwrap_err().to_string();
        assert!(err.contains("10100 pixels") && err.contains("max_pixels"), "{err}");
        cfg.max_bytes = 10;
        assert!(
            matches!(decode(&png(8, 8, 3), 1, 28, 28, &cfg), Err(ImageRefusal::TooLarge(m)) if m.contains("max_bytes"))
        );
    }

    /// The two-step resize of large images stays close to a filtered resize from the full
    /// image (smooth content: area averaging then a triangle filter vs the triangle alone).
    #[test]
    fn large_downscales_match_a_filtered_resize() {
        for (w, h) in [(4000u32, 28u32), (28, 3000), (900, 700), (57, 200)] {
            let img = image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(w, h, |x, y| {
                image::Luma([(255.0 * (x as f64 / w as f64 * 0.7 + y as f64 / h as f64 * 0.3)) as u8])
            }));
            let fast = resize(img.clone(), 28, 28).to_luma8();
            let reference = img.resize_exact(28, 28, FilterType::Triangle).to_luma8();
            assert_eq!(fast.dimensions(), (28, 28));
            let worst = fast.pixels().zip(reference.pixels()).map(|(a, b)| a[0].abs_diff(b[0])).max();
            assert!(worst <= Some(4), "{w}x{h}: worst difference {worst:?} of 255");
        }
        // At the target size nothing is resampled.
        let exact = image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(28, 28, |x, y| {
            image::Luma([(x * 9 + y) as u8])
        }));
        assert_eq!(resize(exact.clone(), 28, 28).to_luma8(), exact.to_luma8());
    }

    /// Inputs on which the decoders panicked under fuzzing (fuzz/regressions/, RESULTS.md):
    /// each is answered as an image, or refused as invalid, never a panic.
    #[test]
    fn decoder_panics_are_refusals() {
        let cfg = ImageConfig::new(vec![0.5; 3], vec![0.5; 3]);
        // png 0.18.1 indexes past a palette whose length is not a multiple of 3 (a panic in
        // every build).
        let png = include_bytes!("../../fuzz/regressions/png-palette-length.png");
        match decode(png, 1, 28, 28, &cfg) {
            Err(ImageRefusal::Invalid(m)) => assert!(m.contains("decoder failed"), "{m}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(!in_guarded_decoder(), "the mark ends with the decoder, panic or not");
        // zune-jpeg 0.5.15 multiplies a DC coefficient past i32 (a panic where overflow is
        // checked, as in test and fuzz builds; it wraps in release builds).
        let jpeg = include_bytes!("../../fuzz/regressions/jpeg-dc-overflow.jpg");
        for channels in [1, 3] {
            match decode(jpeg, channels, 28, 28, &cfg) {
                Ok(v) => assert!(v.len() == channels * 784 && v.iter().all(|x| x.is_finite())),
                Err(ImageRefusal::Invalid(m)) => assert!(m.starts_with("cannot decode image"), "{m}"),
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn rejects_non_images() {
        let cfg = ImageConfig::new(vec![0.0], vec![1.0]);
        assert!(decode(b"hello", 1, 28, 28, &cfg).unwrap_err().to_string().contains("PNG or JPEG"));
        let mut broken = png(8, 8, 1);
        broken.truncate(30);
        assert!(decode(&broken, 1, 28, 28, &cfg).is_err());
    }
}
