//! Training augmentation on the host: random crops from a zero-padded image and horizontal
//! flips, on raw u8 pixels (cheap; the tensors are built once per batch).

use rand::Rng;

/// Writes an augmented copy of each planar `channels × rows × cols` image of `images` into
/// the returned buffer (one crop and flip per image, the same for its channels).
pub fn pad_crop_flip(
    images: &[&[u8]],
    channels: usize,
    rows: usize,
    cols: usize,
    pad: usize,
    rng: &mut impl Rng,
) -> Vec<u8> {
    let plane = rows * cols;
    let mut out = vec![0u8; images.len() * channels * plane];
    for (img, dst) in images.iter().zip(out.chunks_mut(channels * plane)) {
        let dy = rng.gen_range(0..=2 * pad) as isize - pad as isize;
        let dx = rng.gen_range(0..=2 * pad) as isize - pad as isize;
        let flip = rng.gen_bool(0.5);
        for (img, dst) in img.chunks(plane).zip(dst.chunks_mut(plane)) {
            crop_flip_plane(img, dst, rows, cols, dy, dx, flip);
        }
    }
    out
}

/// One channel plane, shifted by (`dy`, `dx`) with zeros outside, optionally mirrored.
fn crop_flip_plane(img: &[u8], dst: &mut [u8], rows: usize, cols: usize, dy: isize, dx: isize, flip: bool) {
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

    #[test]
    fn crops_keep_pixels_and_shapes() {
        let img: Vec<u8> = (0..16).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let out = pad_crop_flip(&[&img], 1, 4, 4, 0, &mut rng);
        // Without padding only the flip can change the image.
        let flipped: Vec<u8> = (0..4).flat_map(|y| (0..4).rev().map(move |x| (y * 4 + x) as u8)).collect();
        assert!(out == img || out == flipped);
        let out = pad_crop_flip(&[&img, &img], 1, 4, 4, 1, &mut rng);
        assert_eq!(out.len(), 32);
        assert!(out.iter().all(|p| *p < 16));
        // Channels of one image move together.
        let rgb: Vec<u8> = (0..16).chain(100..116).collect();
        let out = pad_crop_flip(&[&rgb], 2, 4, 4, 1, &mut rng);
        for (a, b) in out[..16].iter().zip(&out[16..]) {
            assert!(*a == 0 && *b == 0 || *b == *a + 100, "{out:?}");
        }
    }
}
