//! Distillation from a teacher's predictions, optionally softened by a temperature.

use std::ops::RangeInclusive;

use tch::{Kind, Tensor};

/// The temperatures a retrofit accepts: below 1 would sharpen the teacher, which only throws
/// its ranking of the wrong classes away; far above 20 every target is nearly uniform.
pub const DISTILL_TEMPERATURES: RangeInclusive<f64> = 1.0..=20.0;

/// Distillation at temperature `t` (Hinton et al., 2015): `t²` × the cross-entropy of the
/// student's softened prediction (`logits / t`) against `soft`, the teacher's softmax at the
/// same temperature, averaged over rows. The `t²` keeps its gradients the size they are at
/// `t = 1`. (The cross-entropy, not the KL divergence: the two differ by the teacher's
/// entropy, a constant here, so the gradients are the same and the logged loss includes it.)
pub(crate) fn distillation(soft: &Tensor, logits: &Tensor, t: f64) -> Tensor {
    -(soft * (logits / t).log_softmax(1, Kind::Float)).sum(Kind::Float) * (t * t) / logits.size()[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: &[f32]) -> Tensor {
        Tensor::from_slice(v).view([1, v.len() as i64])
    }

    /// The loss written out in plain f64 for one row, as the formula reads.
    fn by_hand(teacher: &[f64], student: &[f64], t: f64) -> f64 {
        let softmax = |z: &[f64]| {
            let e: Vec<f64> = z.iter().map(|v| (v / t).exp()).collect();
            let sum: f64 = e.iter().sum();
            e.into_iter().map(|v| v / sum).collect::<Vec<_>>()
        };
        let (p, q) = (softmax(teacher), softmax(student));
        -t * t * p.iter().zip(&q).map(|(p, q)| p * q.ln()).sum::<f64>()
    }

    #[test]
    fn distillation_is_t_squared_times_the_softened_cross_entropy() {
        let (teacher, student) = ([3.0, 1.0, 0.2, -1.0], [1.5, 2.0, -0.5, 0.0]);
        for t in [1.0, 2.0, 4.0] {
            let soft = (row(&teacher.map(|v| v as f32)) / t).softmax(1, Kind::Float);
            let got = distillation(&soft, &row(&student.map(|v| v as f32)), t).double_value(&[]);
            let want = by_hand(&teacher, &student, t);
            assert!((got - want).abs() < 1e-5 * want.abs().max(1.0), "t = {t}: {got} vs {want}");
        }
    }

    #[test]
    fn a_softened_teacher_passes_on_the_ranking_of_the_wrong_classes() {
        let teacher = row(&[8.0, 3.0, 1.0, 0.0]);
        // Two students with the teacher's top class and the same confidence in it, one ranking
        // the wrong classes as the teacher does and one reversing them.
        let (same, reversed) = (row(&[8.0, 3.0, 1.0, 0.0]), row(&[8.0, 0.0, 1.0, 3.0]));
        let gap = |t: f64| {
            let soft = (&teacher / t).softmax(1, Kind::Float);
            let loss = |s: &Tensor| distillation(&soft, s, t).double_value(&[]);
            loss(&reversed) - loss(&same)
        };
        // At t = 1 the teacher's softmax is nearly one-hot, so the ranking barely counts
        // (0.019); at t = 4 it is a clear part of the loss (1.14).
        assert!(gap(1.0) < 0.05, "{}", gap(1.0));
        assert!(gap(4.0) > 1.0, "{}", gap(4.0));
    }

    #[test]
    fn distillation_gradients_keep_their_size_across_temperatures() {
        let teacher = Tensor::from_slice(&[2.0f32, 1.0, 0.5, -1.0, 0.0, 1.5]).view([2, 3]);
        let norm = |t: f64| {
            let student =
                Tensor::from_slice(&[0.5f32, 1.0, 0.0, 0.0, 1.0, -0.5]).view([2, 3]).set_requires_grad(true);
            let soft = (&teacher / t).softmax(1, Kind::Float);
            distillation(&soft, &student, t).backward();
            student.grad().norm().double_value(&[])
        };
        // With t² the norms at t = 1 and 4 are within a few percent here; with t (or no
        // factor) the one at 4 would be about 4× (16×) smaller.
        let (n1, n4) = (norm(1.0), norm(4.0));
        assert!(n4 > n1 / 1.5 && n4 < n1 * 1.5, "{n1} vs {n4}");
        // A student that already matches its teacher gets no gradient.
        let student = teacher.copy().set_requires_grad(true);
        distillation(&(&teacher / 4.0).softmax(1, Kind::Float), &student, 4.0).backward();
        assert!(student.grad().abs().max().double_value(&[]) < 1e-6);
    }
}
