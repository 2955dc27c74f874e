//! Seeded initialisation on parallel threads (src/engine/model.rs, `GeneratorTurn`).
//!
//! Alone in its test binary: libtorch has one random generator per process, and other tests
//! draw from it without seeding (random inputs and weights) and so without a turn; run in the
//! library's test binary, such a draw landing between a turn's seeding and its last draw made
//! this check fail on a fresh clone (stop 36). A process of its own holds only turn-takers.

use sluice::engine::model::load_params;
use sluice::engine::{ArchSpec, ModelSource};
use tch::Tensor;

/// Every parameter of a random model, in name order, as plain numbers (tensors stay on the
/// thread that made them).
fn random_weights(seed: i64) -> Vec<f32> {
    let spec = ArchSpec::named("resnet20", 1, 10).unwrap();
    let (vs, _params) = load_params(&ModelSource::random(spec, seed)).unwrap();
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named.iter().flat_map(|(_, t)| Vec::<f32>::try_from(t.reshape(-1)).unwrap()).collect()
}

/// Models initialised on several threads at once from two seeds get, per seed, the weights
/// a lone initialisation gets: the threads take turns on libtorch's generator.
#[test]
fn seeded_initialisations_on_parallel_threads_match_a_lone_one() {
    let alone = [random_weights(5), random_weights(6)];
    assert_ne!(alone[0], alone[1], "two seeds, two networks");
    let threads: Vec<_> =
        (0..6).map(|i| std::thread::spawn(move || (i % 2, random_weights(5 + i % 2)))).collect();
    for thread in threads {
        let (which, weights) = thread.join().unwrap();
        assert!(weights == alone[which as usize], "seed {}: weights differ from a lone run", 5 + which);
    }
}
