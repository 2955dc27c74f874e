//! Convolutions on oneDNN primitives sluice owns: the oneDNN library Debian packages (libdnnl
//! 2.6; deploy/setup.sh installs it), driven through a small C++ shim (`onednn.cpp`, compiled
//! by build.rs) that also reads and writes libtorch's tensors in place.
//!
//! A [`PackedConv`] holds one convolution's weights reordered, once, into the blocked layout
//! its kernel wants, and one ready primitive per input shape, so a call is one kernel on
//! channels-last activations: bias, ReLU and a residual block's final add are post-ops of the
//! same primitive ([`PackedConv::conv`], [`PackedConv::conv_add_relu_`]) — no per-call weight
//! reorder, no separate passes over the activations, no framework dispatch in between.

use std::ffi::{CStr, c_char, c_int};
use std::sync::OnceLock;

use tch::Tensor;
use torch_sys::C_tensor;

/// The shim's convolution object (opaque).
#[repr(C)]
struct RawConv {
    _private: [u8; 0],
}

unsafe extern "C" {
    fn sluice_onednn_check() -> *mut c_char;
    fn sluice_onednn_conv_new(
        weight: *const C_tensor,
        bias: *const C_tensor,
        padding: i64,
        stride: i64,
        input_size: *const i64,
        post: c_int,
        algo: c_int,
        out: *mut *mut RawConv,
    ) -> *mut c_char;
    fn sluice_onednn_conv_prepare(conv: *mut RawConv, input_size: *const i64, post: c_int) -> *mut c_char;
    fn sluice_onednn_conv_run(
        conv: *mut RawConv,
        x: *const C_tensor,
        relu: c_int,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn sluice_onednn_conv_add_relu_(
        conv: *mut RawConv,
        acc: *mut C_tensor,
        x: *const C_tensor,
    ) -> *mut c_char;
    fn sluice_onednn_conv_counts(
        conv: *mut RawConv,
        packs: *mut i64,
        primitives: *mut i64,
        winograd: *mut i64,
        subsample: *mut i64,
    );
    fn sluice_onednn_conv_free(conv: *mut RawConv);
    fn sluice_onednn_free_error(message: *mut c_char);
}

/// The shim's error message, if it returned one (and frees it).
fn result(message: *mut c_char) -> Result<(), String> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string malloc'ed by the shim, read once
    // here and then freed by the shim's own allocator.
    let text = unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned();
    unsafe { sluice_onednn_free_error(message) };
    Err(text)
}

/// Whether oneDNN runs on this machine (checked once; the message says why not).
pub fn available() -> Result<(), String> {
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    // SAFETY: takes no arguments; returns NULL or a message for `result`.
    CHECK.get_or_init(|| result(unsafe { sluice_onednn_check() })).clone()
}

/// Which post-ops a primitive applies after the convolution and its bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Post {
    None = 0,
    Relu = 1,
    /// `+ acc`, then ReLU, written into `acc` ([`PackedConv::conv_add_relu_`]).
    AddRelu = 2,
}

/// How a 3×3 stride-1 convolution, or a strided 1×1 one, is computed; every other one is
/// direct.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algo {
    /// Time both for the shapes made at load ([`PackedConv::new`], [`PackedConv::prepare`])
    /// and keep the faster; a shape first seen on a call is not timed (none on a request's
    /// path): a batch size between 1 and 8 takes the kernel both of those chose, anything
    /// else is direct. What the engine uses.
    Fastest = 0,
    /// oneDNN's direct kernel on the channels-last activations.
    Direct = 1,
    /// oneDNN's Winograd kernel (F(2×2 or 4×4, 3×3)), on blocked activations reordered in
    /// and out around it; an error where oneDNN has none for the shape or precision. Direct
    /// for every other shape.
    Winograd = 2,
    /// For a strided 1×1 convolution: a reorder that keeps every stride-th input position,
    /// then the stride-1 kernel on that copy (oneDNN 2.6's strided 1×1 kernel ran
    /// ResNet-50's 512→1024 shortcut at about 2/3 of the stride-1 kernel's rate on the dev
    /// VM). Direct for every other shape.
    Subsample = 3,
}

/// What a [`PackedConv`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counts {
    /// Weight packings, one per distinct layout its primitives asked for.
    pub packs: i64,
    /// Ready primitives (input shapes × post-op kinds).
    pub primitives: i64,
    /// How many of those are Winograd ones.
    pub winograd: i64,
    /// How many of those subsample their input first ([`Algo::Subsample`]).
    pub subsample: i64,
}

/// One convolution on oneDNN: weights packed at construction, a primitive per input shape
/// (made on first use and kept, at most 256; the first made at construction).
#[derive(Debug)]
pub struct PackedConv {
    raw: *mut RawConv,
}

// SAFETY: the shim's object guards its primitive table with a mutex; oneDNN primitives and
// packed weights are read-only once made and may run from several threads at once (each
// thread has its own oneDNN stream).
unsafe impl Send for PackedConv {}
unsafe impl Sync for PackedConv {}

impl Drop for PackedConv {
    fn drop(&mut self) {
        // SAFETY: `raw` came from `sluice_onednn_conv_new` and is freed once, here.
        unsafe { sluice_onednn_conv_free(self.raw) }
    }
}

/// Wraps a tensor the shim allocated.
fn owned(ptr: *mut C_tensor) -> Tensor {
    // SAFETY: the shim returns a fresh heap `at::Tensor` on success, whose ownership passes
    // to the returned `Tensor` (freed by its Drop).
    unsafe { Tensor::from_ptr(ptr) }
}

impl PackedConv {
    /// `weight` (plain `[O, I, k, k]`, in the precision the convolution will run in) and
    /// `bias` (`[O]`), packed for inputs of `input_size` (`[N, C, H, W]`) with `post`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        weight: &Tensor,
        bias: &Tensor,
        padding: i64,
        stride: i64,
        input_size: [i64; 4],
        post: Post,
        algo: Algo,
    ) -> Result<Self, String> {
        available()?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: the tensor pointers are live for the call; `input_size` has the 4 entries
        // the shim reads; `raw` is written only on success.
        result(unsafe {
            sluice_onednn_conv_new(
                weight.as_ptr(),
                bias.as_ptr(),
                padding,
                stride,
                input_size.as_ptr(),
                post as c_int,
                algo as c_int,
                &mut raw,
            )
        })?;
        Ok(PackedConv { raw })
    }

    /// Makes the primitive for inputs of `input_size` with `post` now rather than at its
    /// first call.
    pub fn prepare(&self, input_size: [i64; 4], post: Post) -> Result<(), String> {
        // SAFETY: `raw` is live; `input_size` has the 4 entries the shim reads.
        result(unsafe { sluice_onednn_conv_prepare(self.raw, input_size.as_ptr(), post as c_int) })
    }

    /// `conv(x) + bias`, then ReLU if `relu`: channels-last `x` in, channels-last out.
    /// Panics with oneDNN's message on failure, as tch's own operators do.
    pub fn conv(&self, x: &Tensor, relu: bool) -> Tensor {
        let mut out = std::ptr::null_mut();
        // SAFETY: `raw` and the tensor are live for the call; `out` is written only on success.
        let status = unsafe { sluice_onednn_conv_run(self.raw, x.as_ptr(), c_int::from(relu), &mut out) };
        if let Err(e) = result(status) {
            panic!("oneDNN convolution failed: {e}");
        }
        owned(out)
    }

    /// `acc = relu(conv(x) + bias + acc)`, in place: a residual block's last convolution
    /// with the shortcut add and the ReLU as post-ops. `acc` must be a contiguous
    /// channels-last tensor of the convolution's output shape and precision.
    pub fn conv_add_relu_(&self, acc: &mut Tensor, x: &Tensor) {
        // SAFETY: `raw` and the tensors are live for the call; `acc` is borrowed mutably, so
        // no one else reads it while the shim writes into its storage.
        let status = unsafe { sluice_onednn_conv_add_relu_(self.raw, acc.as_mut_ptr(), x.as_ptr()) };
        if let Err(e) = result(status) {
            panic!("oneDNN convolution failed: {e}");
        }
    }

    /// What this convolution holds.
    pub fn counts(&self) -> Counts {
        let mut c = Counts { packs: 0, primitives: 0, winograd: 0, subsample: 0 };
        // SAFETY: `raw` is live; the shim writes the four counts.
        unsafe {
            sluice_onednn_conv_counts(
                self.raw,
                &mut c.packs,
                &mut c.primitives,
                &mut c.winograd,
                &mut c.subsample,
            )
        };
        c
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    use super::*;

    fn randn(shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    }

    fn channels_last(t: &Tensor) -> Tensor {
        t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// The fused primitives compute what libtorch's unfused convolution does, direct and
    /// Winograd, at stride 1 and 2, for the input size they were made for and for others (a
    /// primitive each, kept).
    #[test]
    fn fused_convolutions_match_the_unfused_ones() {
        let _g = tch::no_grad_guard();
        let _turn = crate::engine::model::GeneratorTurn::seeded(7);
        available().unwrap();
        let cases = [
            (1, 12, Algo::Direct),
            (2, 12, Algo::Direct),
            (1, 20, Algo::Direct),
            (1, 12, Algo::Winograd),
            (2, 12, Algo::Winograd), // stride 2: direct whatever is asked
            (1, 12, Algo::Fastest),
        ];
        for (stride, made_for, algo) in cases {
            let (w, b) = (randn(&[16, 16, 3, 3]), randn(&[16]));
            let conv =
                PackedConv::new(&w, &b, 1, stride, [1, 16, made_for, made_for], Post::Relu, algo).unwrap();
            let at_start = conv.counts();
            assert_eq!(at_start.primitives, 1, "one primitive at construction");
            let winograd = algo == Algo::Winograd && stride == 1;
            if algo == Algo::Fastest {
                // The timing's loser leaves no packing behind: direct's, plus Winograd's if it won.
                assert_eq!(at_start.packs, 1 + at_start.winograd, "{at_start:?}");
            } else {
                assert_eq!(at_start.winograd, i64::from(winograd), "{algo:?} at stride {stride}");
            }
            for batch in [1, 2, 5] {
                let x = channels_last(&randn(&[batch, 16, 12, 12]));
                let reference = x.conv2d(&w, Some(&b), [stride; 2], [1; 2], [1, 1], 1);
                let tolerance = 1e-4 * reference.abs().max().double_value(&[]).max(1.0);
                let case = format!("{algo:?}, stride {stride}, made for {made_for}, b{batch}");

                let plain = conv.conv(&x, false);
                let [_, c, h, w] = plain.size()[..] else { panic!("a 4-d output") };
                assert_eq!(plain.stride(), vec![h * w * c, 1, w * c, c], "channels-last out");
                assert!(max_diff(&plain, &reference) < tolerance, "{case}");
                let relu = conv.conv(&x, true);
                assert!(max_diff(&relu, &reference.relu()) < tolerance, "{case}");
                assert!(relu.min().double_value(&[]) >= 0.0);

                let shortcut = channels_last(&randn(&reference.size()));
                let expected = (&reference + &shortcut).relu();
                let mut acc = shortcut.copy();
                conv.conv_add_relu_(&mut acc, &x);
                assert!(
                    max_diff(&acc, &expected) < tolerance,
                    "the add is written into the shortcut: {case}"
                );
                // An NCHW input is taken too (made channels-last first).
                let nchw = x.contiguous();
                assert!(max_diff(&conv.conv(&nchw, false), &reference) < tolerance, "{case}");
            }
            let held = conv.counts();
            assert!(held.primitives >= 6, "three batch sizes × two post-op kinds kept: {held:?}");
            assert!((1..=held.primitives + 1).contains(&held.packs), "packings are shared: {held:?}");
            if algo == Algo::Direct || stride == 2 {
                assert_eq!(held.winograd, 0, "{algo:?}");
            } else if algo == Algo::Winograd {
                assert_eq!(held.winograd, held.primitives, "every primitive is a Winograd one");
            }
        }
    }

    /// A strided 1×1 convolution (a downsampling shortcut) computes the same whether oneDNN
    /// strides it or sluice subsamples its input first, for every post-op and for sizes the
    /// stride does not divide (direct there); `Fastest` keeps one of the two.
    #[test]
    fn strided_pointwise_convolutions_match_when_subsampled() {
        let _g = tch::no_grad_guard();
        let _turn = crate::engine::model::GeneratorTurn::seeded(5);
        for (algo, stride) in
            [(Algo::Subsample, 2), (Algo::Subsample, 3), (Algo::Direct, 2), (Algo::Fastest, 2)]
        {
            let (w, b) = (randn(&[32, 16, 1, 1]), randn(&[32]));
            let conv = PackedConv::new(&w, &b, 0, stride, [1, 16, 12, 12], Post::AddRelu, algo).unwrap();
            let at_start = conv.counts();
            match algo {
                Algo::Subsample => assert_eq!(at_start.subsample, 1, "{at_start:?}"),
                Algo::Direct => assert_eq!(at_start.subsample, 0, "{at_start:?}"),
                _ => assert!(at_start.subsample <= 1 && at_start.winograd == 0, "{at_start:?}"),
            }
            for (batch, side) in [(1, 12), (3, 13), (2, 7)] {
                let x = channels_last(&randn(&[batch, 16, side, side]));
                let reference = x.conv2d(&w, Some(&b), [stride; 2], [0; 2], [1, 1], 1);
                let case = format!("{algo:?}, stride {stride}, b{batch}, {side}x{side}");
                let tolerance = 1e-4 * reference.abs().max().double_value(&[]).max(1.0);
                let y = conv.conv(&x, true);
                assert_eq!(y.size(), reference.size(), "{case}");
                assert!(max_diff(&y, &reference.relu()) < tolerance, "{case}");
                let shortcut = channels_last(&randn(&reference.size()));
                let mut acc = shortcut.copy();
                conv.conv_add_relu_(&mut acc, &x);
                assert!(max_diff(&acc, &(&reference + &shortcut).relu()) < tolerance, "{case}");
            }
            if algo == Algo::Subsample {
                let held = conv.counts();
                // Only 12x12 is divided by the stride: its two post-op kinds subsample.
                assert_eq!((held.subsample, held.primitives), (2, 6), "{held:?}");
            }
        }
        // A 3x3 convolution, or a 1x1 one at stride 1, never subsamples.
        for (k, stride) in [(3, 2), (1, 1)] {
            let (w, b) = (randn(&[8, 8, k, k]), randn(&[8]));
            let conv =
                PackedConv::new(&w, &b, k / 2, stride, [1, 8, 8, 8], Post::None, Algo::Subsample).unwrap();
            assert_eq!(conv.counts().subsample, 0, "{k}x{k} at stride {stride}");
        }
        // bf16 (a bf16 model's shortcuts take the same path).
        if crate::engine::folded::Precision::Bf16.check().is_ok() {
            let (w, b) = (randn(&[32, 16, 1, 1]), randn(&[32]));
            let conv = PackedConv::new(
                &w.to_kind(Kind::BFloat16),
                &b,
                0,
                2,
                [2, 16, 12, 12],
                Post::Relu,
                Algo::Subsample,
            )
            .unwrap();
            assert_eq!(conv.counts().subsample, 1);
            let x = channels_last(&randn(&[2, 16, 12, 12]));
            let reference = x.conv2d(&w, Some(&b), [2; 2], [0; 2], [1, 1], 1).relu();
            let y = conv.conv(&x.to_kind(Kind::BFloat16), true).to_kind(Kind::Float);
            let scale = reference.abs().max().double_value(&[]);
            assert!(max_diff(&y, &reference) < 0.02 * scale, "bf16 subsampled");
        }
    }

    /// A batch size between 1 and 8 (a mixed batch's sub-batch) is not timed: it takes the
    /// kernel the load-time timing chose at both 1 and 8, and direct where they differ.
    #[test]
    fn sub_batches_take_the_kernel_both_timed_sizes_chose() {
        let _g = tch::no_grad_guard();
        let _turn = crate::engine::model::GeneratorTurn::seeded(13);
        let (w, b) = (randn(&[32, 32, 3, 3]), randn(&[32]));
        let conv = PackedConv::new(&w, &b, 1, 1, [1, 32, 28, 28], Post::Relu, Algo::Fastest).unwrap();
        conv.prepare([8, 32, 28, 28], Post::Relu).unwrap();
        let timed = conv.counts();
        assert_eq!(timed.primitives, 2);
        let x = channels_last(&randn(&[4, 32, 28, 28]));
        let reference = x.conv2d(&w, Some(&b), [1; 2], [1; 2], [1, 1], 1).relu();
        assert!(max_diff(&conv.conv(&x, true), &reference) < 1e-4 * reference.abs().max().double_value(&[]));
        let after = conv.counts();
        assert_eq!(after.primitives, 3);
        let expected = match timed.winograd {
            2 => 3, // both Winograd: the sub-batch too
            n => n, // both direct, or they differ: direct
        };
        assert_eq!(after.winograd, expected, "timed {timed:?}, after {after:?}");
    }

    /// Winograd on channel counts that are not multiples of 16 (its blocked layouts pad them)
    /// computes what libtorch does, direct into a new tensor and added into a shortcut, also
    /// right after memory of the padded buffers' size was filled with NaN and freed (which
    /// the allocator tends to hand back): the padding is written, never read stale.
    #[test]
    fn padded_winograd_reads_no_stale_padding() {
        let _g = tch::no_grad_guard();
        let _turn = crate::engine::model::GeneratorTurn::seeded(9);
        for (cin, cout) in [(40, 40), (24, 56), (8, 8)] {
            let (w, b) = (randn(&[cout, cin, 3, 3]), randn(&[cout]));
            let conv =
                PackedConv::new(&w, &b, 1, 1, [2, cin, 14, 14], Post::AddRelu, Algo::Winograd).unwrap();
            assert_eq!(conv.counts().winograd, 1, "{cin}->{cout}");
            let x = channels_last(&randn(&[2, cin, 14, 14]));
            let reference = x.conv2d(&w, Some(&b), [1; 2], [1; 2], [1, 1], 1);
            let tolerance = 1e-4 * reference.abs().max().double_value(&[]).max(1.0);
            for round in 0..20 {
                // Freed just before the call: the allocator tends to hand this memory back.
                for padded in [cin, cout].map(|c: i64| (c + 15) / 16 * 16) {
                    drop(Tensor::full([2 * padded * 14 * 14], f64::NAN, (Kind::Float, Device::Cpu)));
                }
                let y = conv.conv(&x, false);
                assert!(max_diff(&y, &reference) < tolerance, "{cin}->{cout}, round {round}");
                let shortcut = channels_last(&randn(&reference.size()));
                let mut acc = shortcut.copy();
                conv.conv_add_relu_(&mut acc, &x);
                assert!(max_diff(&acc, &(&reference + &shortcut).relu()) < tolerance, "{cin}->{cout}, add");
            }
        }
    }

    /// At most 256 primitives are kept per convolution; shapes past the cap still compute
    /// correctly, on a primitive made for the call.
    #[test]
    fn the_primitive_table_is_bounded() {
        let _g = tch::no_grad_guard();
        let _turn = crate::engine::model::GeneratorTurn::seeded(11);
        let (w, b) = (randn(&[4, 4, 1, 1]), randn(&[4]));
        let conv = PackedConv::new(&w, &b, 0, 1, [1, 4, 2, 2], Post::None, Algo::Direct).unwrap();
        for batch in 2..=260 {
            let x = channels_last(&randn(&[batch, 4, 2, 2]));
            let y = conv.conv(&x, false);
            if batch == 260 {
                let reference = x.conv2d(&w, Some(&b), [1; 2], [0; 2], [1, 1], 1);
                assert!(max_diff(&y, &reference) < 1e-4, "past the cap the result is still right");
            }
        }
        assert_eq!(conv.counts().primitives, 256);
    }

    /// bf16 weights and activations run as bf16 (FP32 accumulation) and stay close to FP32.
    #[test]
    fn bf16_convolutions_follow_fp32() {
        let _g = tch::no_grad_guard();
        let _turn = crate::engine::model::GeneratorTurn::seeded(3);
        let (w, b) = (randn(&[16, 8, 3, 3]), randn(&[16]));
        let x = channels_last(&randn(&[2, 8, 10, 10]));
        let reference = x.conv2d(&w, Some(&b), [1; 2], [1; 2], [1, 1], 1);
        let conv =
            PackedConv::new(&w.to_kind(Kind::BFloat16), &b, 1, 1, [2, 8, 10, 10], Post::None, Algo::Fastest)
                .unwrap();
        let y = conv.conv(&x.to_kind(Kind::BFloat16), false);
        assert_eq!(y.kind(), Kind::BFloat16);
        let scale = reference.abs().max().double_value(&[]);
        assert!(max_diff(&y.to_kind(Kind::Float), &reference) < 0.02 * scale);
    }

    /// A wrong input comes back as a message naming the problem (a panic, as tch's own
    /// operators do; the engine worker turns it into an error reply).
    #[test]
    fn a_shape_mismatch_is_a_message_not_a_crash() {
        let _g = tch::no_grad_guard();
        let conv = PackedConv::new(
            &randn(&[8, 4, 3, 3]),
            &randn(&[8]),
            1,
            1,
            [1, 4, 8, 8],
            Post::None,
            Algo::Direct,
        )
        .unwrap();
        let wrong_channels = channels_last(&randn(&[1, 5, 8, 8]));
        let caught = std::panic::catch_unwind(|| conv.conv(&wrong_channels, false));
        let message =
            caught.expect_err("5 channels into a 4-channel convolution").downcast::<String>().unwrap();
        assert!(message.starts_with("oneDNN convolution failed: "), "{message}");
        assert!(message.contains("[N, 4, H, W]"), "{message}");
        let mut small = channels_last(&randn(&[1, 8, 4, 4]));
        let x = channels_last(&randn(&[1, 4, 8, 8]));
        let caught =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| conv.conv_add_relu_(&mut small, &x)));
        assert!(caught.is_err(), "a shortcut of the wrong shape is refused");
        let bad =
            PackedConv::new(&randn(&[8, 4]), &randn(&[8]), 1, 1, [1, 4, 8, 8], Post::None, Algo::Direct);
        assert!(bad.unwrap_err().contains("[O, I, k, k]"), "a 2-d weight is refused");
        let double = PackedConv::new(
            &randn(&[8, 4, 3, 3]).to_kind(Kind::Double),
            &randn(&[8]),
            1,
            1,
            [1, 4, 8, 8],
            Post::None,
            Algo::Direct,
        );
        assert!(double.unwrap_err().contains("float32 or bfloat16"));
    }
}
