//! Triton's BYTES serialization (`prepare::split_length_prefixed`): 4-byte little-endian
//! lengths, each followed by its element. Input layout: `[max_elements, raw...]`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::serving::prepare::split_length_prefixed;

fuzz_target!(|data: &[u8]| {
    let [max, raw @ ..] = data else { return };
    let max = *max as usize;
    match split_length_prefixed(raw, max) {
        Ok(elements) => {
            assert!(elements.len() <= max, "{} elements > max {max}", elements.len());
            let total: usize = elements.iter().map(|e| e.len()).sum();
            assert_eq!(total + 4 * elements.len(), raw.len(), "elements and prefixes must cover the input");
            // Each element lies in the input, after its own prefix, in order.
            let mut at = 0usize;
            for e in &elements {
                let len = u32::from_le_bytes(raw[at..at + 4].try_into().unwrap()) as usize;
                assert_eq!(len, e.len());
                assert_eq!(e.as_ptr(), raw[at + 4..].as_ptr());
                at += 4 + len;
            }
            assert_eq!(at, raw.len());
            // A larger limit never changes an accepted split.
            assert_eq!(split_length_prefixed(raw, usize::MAX).unwrap(), elements);
        }
        Err(message) => {
            assert!(!message.is_empty());
            // Refused for the count only when there really are more than `max` elements.
            if message.starts_with("more than the") {
                assert!(split_length_prefixed(raw, usize::MAX).map_or(true, |all| all.len() > max));
            }
        }
    }
});
