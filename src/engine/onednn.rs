//! oneDNN's fused convolutions, which tch does not bind: libtorch's
//! `mkldnn::_convolution_pointwise` family (what PyTorch's own compiler emits for CPU
//! convolutions), called through a small C++ shim (`onednn.cpp`, compiled by build.rs).
//!
//! With them a convolution runs on weights reordered once, at load, into the blocked layout
//! its oneDNN kernel wants ([`pack_weight`]), reads and writes plain channels-last
//! activations, and applies its bias, ReLU and a residual block's final add as post-ops of
//! the same primitive ([`conv`], [`conv_add_relu_`]) — no per-call weight reorder, no
//! separate passes over the activations.

use std::ffi::{CStr, c_char, c_int};
use std::sync::OnceLock;

use tch::Tensor;
use torch_sys::C_tensor;

unsafe extern "C" {
    fn sluice_onednn_check() -> *mut c_char;
    fn sluice_onednn_pack_weight(
        weight: *const C_tensor,
        padding: i64,
        stride: i64,
        input_size: *const i64,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn sluice_onednn_conv(
        x: *const C_tensor,
        weight: *const C_tensor,
        bias: *const C_tensor,
        padding: i64,
        stride: i64,
        relu: c_int,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn sluice_onednn_conv_add_relu_(
        acc: *mut C_tensor,
        x: *const C_tensor,
        weight: *const C_tensor,
        bias: *const C_tensor,
        padding: i64,
        stride: i64,
    ) -> *mut c_char;
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

/// Whether this libtorch has the fused operators with the signatures the shim was compiled
/// for (checked once; the message says why not).
pub fn available() -> Result<(), String> {
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    // SAFETY: takes no arguments; returns NULL or a message for `result`.
    CHECK.get_or_init(|| result(unsafe { sluice_onednn_check() })).clone()
}

/// Wraps a tensor the shim allocated.
fn owned(ptr: *mut C_tensor) -> Tensor {
    // SAFETY: the shim returns a fresh heap `at::Tensor` on success, whose ownership passes
    // to the returned `Tensor` (freed by its Drop).
    unsafe { Tensor::from_ptr(ptr) }
}

/// `weight` (plain `[O, I, kH, kW]`, in the precision the convolution will run in)
/// reordered for inputs of `input_size` (`[N, C, H, W]`): a oneDNN tensor for [`conv`].
pub fn pack_weight(
    weight: &Tensor,
    padding: i64,
    stride: i64,
    input_size: [i64; 4],
) -> Result<Tensor, String> {
    available()?;
    let mut out = std::ptr::null_mut();
    // SAFETY: the tensor pointers are live for the call; `input_size` has the 4 entries
    // the shim reads; `out` is written only on success.
    result(unsafe {
        sluice_onednn_pack_weight(weight.as_ptr(), padding, stride, input_size.as_ptr(), &mut out)
    })?;
    Ok(owned(out))
}

/// `conv(x, weight) + bias`, then ReLU if `relu`: channels-last `x` in, channels-last out.
/// Panics with libtorch's message on failure, as tch's own operators do.
pub fn conv(x: &Tensor, weight: &Tensor, bias: &Tensor, padding: i64, stride: i64, relu: bool) -> Tensor {
    let mut out = std::ptr::null_mut();
    // SAFETY: the tensor pointers are live for the call; `out` is written only on success.
    let status = unsafe {
        sluice_onednn_conv(
            x.as_ptr(),
            weight.as_ptr(),
            bias.as_ptr(),
            padding,
            stride,
            c_int::from(relu),
            &mut out,
        )
    };
    if let Err(e) = result(status) {
        panic!("oneDNN convolution failed: {e}");
    }
    owned(out)
}

/// `acc = relu(conv(x, weight) + bias + acc)`, in place: a residual block's last
/// convolution with the shortcut add and the ReLU as post-ops. `acc` must be channels-last
/// with the convolution's output shape and precision.
pub fn conv_add_relu_(
    acc: &mut Tensor,
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    padding: i64,
    stride: i64,
) {
    // SAFETY: the tensor pointers are live for the call; `acc` is borrowed mutably, so no
    // one else reads it while the shim writes into its storage.
    let status = unsafe {
        sluice_onednn_conv_add_relu_(
            acc.as_mut_ptr(),
            x.as_ptr(),
            weight.as_ptr(),
            bias.as_ptr(),
            padding,
            stride,
        )
    };
    if let Err(e) = result(status) {
        panic!("oneDNN convolution failed: {e}");
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

    /// The fused operators compute what libtorch's unfused ones do, on weights packed for
    /// the input size and for another one (which oneDNN must handle by itself), at stride
    /// 1 and 2.
    #[test]
    fn fused_convolutions_match_the_unfused_ones() {
        let _g = tch::no_grad_guard();
        tch::manual_seed(7);
        available().unwrap();
        for (stride, packed_for) in [(1, 12), (2, 12), (1, 20)] {
            let (w, b) = (randn(&[8, 4, 3, 3]), randn(&[8]));
            let x = channels_last(&randn(&[2, 4, 12, 12]));
            let packed = pack_weight(&w, 1, stride, [1, 4, packed_for, packed_for]).unwrap();
            let reference = x.conv2d(&w, Some(&b), [stride; 2], [1; 2], [1, 1], 1);

            let plain = conv(&x, &packed, &b, 1, stride, false);
            assert!(max_diff(&plain, &reference) < 1e-4, "stride {stride}, packed for {packed_for}");
            let relu = conv(&x, &packed, &b, 1, stride, true);
            assert!(max_diff(&relu, &reference.relu()) < 1e-4);
            assert!(relu.min().double_value(&[]) >= 0.0);

            let shortcut = channels_last(&randn(&reference.size()));
            let expected = (&reference + &shortcut).relu();
            let mut acc = shortcut.copy();
            conv_add_relu_(&mut acc, &x, &packed, &b, 1, stride);
            assert!(max_diff(&acc, &expected) < 1e-4, "the add is written into the shortcut");
        }
    }

    /// libtorch's refusal comes back as a message naming the problem (a panic, as tch's own
    /// operators do; the engine worker turns it into an error reply).
    #[test]
    fn a_shape_mismatch_is_libtorchs_message_not_a_crash() {
        let _g = tch::no_grad_guard();
        let packed = pack_weight(&randn(&[8, 4, 3, 3]), 1, 1, [1, 4, 8, 8]).unwrap();
        let wrong_channels = channels_last(&randn(&[1, 5, 8, 8]));
        let caught = std::panic::catch_unwind(|| conv(&wrong_channels, &packed, &randn(&[8]), 1, 1, false));
        let message =
            caught.expect_err("5 channels into a 4-channel convolution").downcast::<String>().unwrap();
        assert!(message.starts_with("oneDNN convolution failed: "), "{message}");
        assert!(pack_weight(&randn(&[8, 4]), 1, 1, [1, 4, 8, 8]).is_err(), "a 2-d weight is refused");
    }
}
