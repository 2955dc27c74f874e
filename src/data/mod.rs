//! Datasets: Fashion-MNIST from Debian's `dataset-fashion-mnist`.

pub mod fashion_mnist;

pub use fashion_mnist::{FashionMnist, Split};
