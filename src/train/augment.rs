//! Training augmentation on the host, on raw u8 planar pixels, the standard recipe for the
//! input size: random crops from a zero-padded image for small inputs, torchvision's random
//! resized crop (8–100% of the area, aspect 3/4–4/3, bilinear back to the input size) for
//! ImageNet-size ones, each with a horizontal flip. The random draws happen in order on the
//! caller's generator (a seeded run stays reproducible); the pixel work of a batch is split
//! over scoped threads when it is large enough to pay for them ([`MIN_BYTES_PER_THREAD`]).

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Which augmentation `sluice train` applies (`--augment`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Augment {
    /// Pad-crop below [`RESIZED_CROP_FROM`] pixels, resized-crop from there.
    #[default]
    Auto,
    PadCrop,
    ResizedCrop,
    /// Flips only.
    None,
}

/// Output bytes below which a batch's pixel work stays on the calling thread (spawning
/// costs more than a few hundred kilobytes of crops).
pub const MIN_BYTES_PER_THREAD: usize = 1 << 20;

/// Inputs at least this tall or wide count as ImageNet-size for [`Augment::Auto`].
pub const RESIZED_CROP_FROM: usize = 96;

impl Augment {
    /// `Auto` resolved for an input of `rows × cols`.
    pub fn resolve(self, rows: usize, cols: usize) -> Augment {
        match self {
            Augment::Auto if rows.max(cols) >= RESIZED_CROP_FROM => Augment::ResizedCrop,
            Augment::Auto => Augment::PadCrop,
            other => other,
        }
    }
}

/// One image's draw: the source window (`top`, `left`, `height`, `width`; may reach outside
/// the image for pad-crop, where it reads zeros) and the flip.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Window {
    top: isize,
    left: isize,
    height: usize,
    width: usize,
    flip: bool,
}

/// An augmented copy of each planar `channels × rows × cols` image of `images`, one draw per
/// image (its channels move together). `pad` is pad-crop's padding; `threads` share the
/// pixel work.
pub fn augment(
    kind: Augment,
    images: &[&[u8]],
    [channels, rows, cols]: [usize; 3],
    pad: usize,
    threads: usize,
    rng: &mut impl Rng,
) -> Vec<u8> {
    let kind = kind.resolve(rows, cols);
    let windows: Vec<Window> = images
        .iter()
        .map(|_| match kind {
            Augment::PadCrop => {
                let dy = rng.gen_range(0..=2 * pad) as isize - pad as isize;
                let dx = rng.gen_range(0..=2 * pad) as isize - pad as isize;
                Window { top: dy, left: dx, height: rows, width: cols, flip: rng.gen_bool(0.5) }
            }
            Augment::ResizedCrop => resized_crop_window(rows, cols, rng),
            Augment::None | Augment::Auto => {
                Window { top: 0, left: 0, height: rows, width: cols, flip: rng.gen_bool(0.5) }
            }
        })
        .collect();
    let image_bytes = channels * rows * cols;
    let mut out = vec![0u8; images.len() * image_bytes];
    let threads = threads.min(out.len() / MIN_BYTES_PER_THREAD).max(1);
    let per_thread = images.len().div_ceil(threads).max(1);
    let work = |imgs: &[&[u8]], wins: &[Window], dst: &mut [u8]| {
        for ((img, win), dst) in imgs.iter().zip(wins).zip(dst.chunks_mut(image_bytes)) {
            for (src, dst) in img.chunks(rows * cols).zip(dst.chunks_mut(rows * cols)) {
                if win.height == rows && win.width == cols {
                    shift_flip_plane(src, dst, rows, cols, win.top, win.left, win.flip);
                } else {
                    resize_flip_plane(src, dst, rows, cols, win);
                }
            }
        }
    };
    if threads == 1 {
        work(images, &windows, &mut out);
        return out;
    }
    std::thread::scope(|scope| {
        for ((imgs, wins), dst) in images
            .chunks(per_thread)
            .zip(windows.chunks(per_thread))
            .zip(out.chunks_mut(per_thread * image_bytes))
        {
            scope.spawn(move || work(imgs, wins, dst));
        }
    });
    out
}

/// torchvision's `RandomResizedCrop` draw (scale 0.08–1, log-uniform aspect 3/4–4/3, ten
/// tries), plus a flip. Where all ten fail (only possible for very elongated inputs) it
/// falls back to the whole image, where torchvision takes a centre crop clamped to the
/// aspect range.
fn resized_crop_window(rows: usize, cols: usize, rng: &mut impl Rng) -> Window {
    let area = (rows * cols) as f64;
    let flip = rng.gen_bool(0.5);
    for _ in 0..10 {
        let target = area * rng.gen_range(0.08..=1.0);
        let aspect = rng.gen_range((3.0f64 / 4.0).ln()..=(4.0f64 / 3.0).ln()).exp();
        let width = (target * aspect).sqrt().round() as usize;
        let height = (target / aspect).sqrt().round() as usize;
        if (1..=cols).contains(&width) && (1..=rows).contains(&height) {
            let top = rng.gen_range(0..=rows - height) as isize;
            let left = rng.gen_range(0..=cols - width) as isize;
            return Window { top, left, height, width, flip };
        }
    }
    Window { top: 0, left: 0, height: rows, width: cols, flip }
}

/// One channel plane's window resampled bilinearly (half-pixel centres, as torchvision's
/// antialias-free resize) to `rows × cols`, optionally mirrored.
fn resize_flip_plane(img: &[u8], dst: &mut [u8], rows: usize, cols: usize, win: &Window) {
    let sy = win.height as f32 / rows as f32;
    let sx = win.width as f32 / cols as f32;
    let (top, left) = (win.top as usize, win.left as usize);
    let taps = |scale: f32, i: usize, len: usize| {
        let f = ((i as f32 + 0.5) * scale - 0.5).clamp(0.0, (len - 1) as f32);
        let i0 = f.floor() as usize;
        (i0, (i0 + 1).min(len - 1), f - i0 as f32)
    };
    let xs: Vec<(usize, usize, f32)> = (0..cols).map(|x| taps(sx, x, win.width)).collect();
    for y in 0..rows {
        let (y0, y1, fy) = taps(sy, y, win.height);
        let r0 = &img[(top + y0) * cols + left..];
        let r1 = &img[(top + y1) * cols + left..];
        for x in 0..cols {
            let (x0, x1, fx) = xs[if win.flip { cols - 1 - x } else { x }];
            let a = r0[x0] as f32 + (r0[x1] as f32 - r0[x0] as f32) * fx;
            let b = r1[x0] as f32 + (r1[x1] as f32 - r1[x0] as f32) * fx;
            dst[y * cols + x] = (a + (b - a) * fy).round() as u8;
        }
    }
}

/// One channel plane, shifted by (`dy`, `dx`) with zeros outside, optionally mirrored.
fn shift_flip_plane(img: &[u8], dst: &mut [u8], rows: usize, cols: usize, dy: isize, dx: isize, flip: bool) {
    for y in 0..rows {
        let sy = y as isize + dy;
        if sy < 0 || sy >= rows as isize {
            continue;
        }
        for x in 0..cols {
            let tx = if flip { cols - 1 - x } else { x };
            let sx = tx as isize + dx;
            if sx >= 0 && sx < cols as isize {
                dst[y * cols + x] = img[sy as usize * cols + sx as usize];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn pad_crop(images: &[&[u8]], shape: [usize; 3], pad: usize, rng: &mut impl Rng) -> Vec<u8> {
        augment(Augment::PadCrop, images, shape, pad, 2, rng)
    }

    #[test]
    fn crops_keep_pixels_and_shapes() {
        let img: Vec<u8> = (0..16).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let out = pad_crop(&[&img], [1, 4, 4], 0, &mut rng);
        // Without padding only the flip can change the image.
        let flipped: Vec<u8> = (0..4).flat_map(|y| (0..4).rev().map(move |x| (y * 4 + x) as u8)).collect();
        assert!(out == img || out == flipped);
        let out = pad_crop(&[&img, &img], [1, 4, 4], 1, &mut rng);
        assert_eq!(out.len(), 32);
        assert!(out.iter().all(|p| *p < 16));
        // Channels of one image move together.
        let rgb: Vec<u8> = (0..16).chain(100..116).collect();
        let out = pad_crop(&[&rgb], [2, 4, 4], 1, &mut rng);
        for (a, b) in out[..16].iter().zip(&out[16..]) {
            assert!(*a == 0 && *b == 0 || *b == *a + 100, "{out:?}");
        }
    }

    /// The shipped model's recipe depends on this order: per image dy, dx, then the flip,
    /// drawn from the run's generator (as before `--augment` existed).
    #[test]
    fn pad_crop_draws_dy_dx_flip_per_image_in_order() {
        let images: Vec<Vec<u8>> =
            (0..6u8).map(|k| (0..2 * 28 * 28).map(|i| (i % 200) as u8 + k).collect()).collect();
        let refs: Vec<&[u8]> = images.iter().map(|v| &v[..]).collect();
        let got = pad_crop(&refs, [2, 28, 28], 2, &mut rand::rngs::StdRng::seed_from_u64(5));
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut want = vec![0u8; got.len()];
        for (img, dst) in refs.iter().zip(want.chunks_mut(2 * 28 * 28)) {
            let dy = rng.gen_range(0..=4usize) as isize - 2;
            let dx = rng.gen_range(0..=4usize) as isize - 2;
            let flip = rng.gen_bool(0.5);
            for (src, dst) in img.chunks(28 * 28).zip(dst.chunks_mut(28 * 28)) {
                shift_flip_plane(src, dst, 28, 28, dy, dx, flip);
            }
        }
        assert!(got == want, "the pad-crop draws changed order");
    }

    #[test]
    fn auto_picks_the_recipe_by_input_size() {
        assert_eq!(Augment::Auto.resolve(32, 32), Augment::PadCrop);
        assert_eq!(Augment::Auto.resolve(224, 224), Augment::ResizedCrop);
        assert_eq!(Augment::Auto.resolve(28, 96), Augment::ResizedCrop);
        assert_eq!(Augment::None.resolve(224, 224), Augment::None);
    }

    #[test]
    fn resizing_reads_the_window_it_drew() {
        let img: Vec<u8> = (0..64).map(|i| i * 3).collect(); // 8×8, value = 3 × index
        let whole = Window { top: 0, left: 0, height: 8, width: 8, flip: false };
        let mut dst = vec![0u8; 64];
        resize_flip_plane(&img, &mut dst, 8, 8, &whole);
        assert_eq!(dst, img, "the whole image at scale 1 is the identity");
        // The bottom-right 4×4 quarter, upscaled 2×: every output lies within that quarter's
        // values, the corners are its corners, and a flip mirrors the rows.
        let quarter = Window { top: 4, left: 4, height: 4, width: 4, flip: false };
        resize_flip_plane(&img, &mut dst, 8, 8, &quarter);
        let inside: Vec<u8> = (4..8).flat_map(|y| (4..8).map(move |x| ((y * 8 + x) * 3) as u8)).collect();
        let (lo, hi) = (*inside.iter().min().unwrap(), *inside.iter().max().unwrap());
        assert!(dst.iter().all(|p| (lo..=hi).contains(p)), "{dst:?}");
        assert_eq!((dst[0], dst[63]), (lo, hi));
        let mut mirrored = vec![0u8; 64];
        resize_flip_plane(&img, &mut mirrored, 8, 8, &Window { flip: true, ..quarter });
        for y in 0..8 {
            let row: Vec<u8> = dst[y * 8..y * 8 + 8].iter().rev().copied().collect();
            assert_eq!(&mirrored[y * 8..y * 8 + 8], &row[..]);
        }
    }

    #[test]
    fn resized_crop_windows_fit_and_the_thread_count_does_not_change_the_batch() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..1000 {
            let w = resized_crop_window(224, 160, &mut rng);
            assert!(w.top >= 0 && w.left >= 0 && w.height >= 1 && w.width >= 1);
            assert!(w.top as usize + w.height <= 224 && w.left as usize + w.width <= 160, "{w:?}");
        }
        // 24 images of 3×224×224 (3.6 MB): work for three threads.
        let plane = 3 * 224 * 224;
        let images: Vec<Vec<u8>> =
            (0..24u8).map(|k| (0..plane).map(|i| (i % 251) as u8 ^ k).collect()).collect();
        let refs: Vec<&[u8]> = images.iter().map(|v| &v[..]).collect();
        let run = |threads| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(3);
            augment(Augment::Auto, &refs, [3, 224, 224], 4, threads, &mut rng)
        };
        let one = run(1);
        assert_eq!(one.len(), 24 * plane);
        assert_eq!(one, run(3));
        let cropped = images.iter().zip(one.chunks(plane)).filter(|(a, b)| a[..] != b[..]).count();
        assert!(cropped >= 20, "224×224 inputs get resized crops: {cropped} of 24 changed");
    }
}
