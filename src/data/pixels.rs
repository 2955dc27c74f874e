//! Decoding PNG/JPEG images to pixels at a model's input size, shared by the server (image
//! inputs) and the dataset loaders, so a model sees images prepared the same way in
//! training, evaluation and serving.

use image::imageops::FilterType;

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

/// Decodes one encoded PNG or JPEG into `height × width` pixels of `channels` (1: grayscale,
/// 3: RGB), interleaved, or says why it cannot. `max_bytes` and `max_pixels` are checked
/// from the byte count and the header before a pixel is decoded; their messages name the
/// model settings that hold them (`input.image.*`).
pub fn decode_pixels(
    bytes: &[u8],
    channels: usize,
    height: u32,
    width: u32,
    max_bytes: usize,
    max_pixels: u64,
) -> Result<Vec<u8>, ImageRefusal> {
    if bytes.len() > max_bytes {
        return Err(ImageRefusal::TooLarge(format!(
            "{} bytes of encoded image; this model accepts at most {} (input.image.max_bytes)",
            bytes.len(),
            max_bytes
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
    if pixels > max_pixels {
        return Err(ImageRefusal::TooLarge(format!(
            "the image is {w}×{h} = {pixels} pixels; this model accepts at most {max_pixels} (input.image.max_pixels)"
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
    Ok(match channels {
        1 => img.to_luma8().into_raw(),
        _ => img.to_rgb8().into_raw(),
    })
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
}
