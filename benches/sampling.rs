//! Sampling cost per token: the logits processors plus the draw, at SmolLM2's (49k) and Qwen2's
//! (152k) vocabularies, batch 1 and 16, with top_k=50, top_p=0.9, temperature 0.7.
//!
//!     cargo bench --bench sampling
//!
//! Prints the median milliseconds per step (all rows) over repeated runs.

use std::time::Instant;

use kvgen::sampling::config::ProcessorConfig;
use kvgen::sampling::processors::{build, RowContext};
use kvgen::sampling::sample::{sample, RowRng};

fn random_logits(n: usize, seed: u64) -> Vec<f32> {
    // xorshift: no extra dependency for benchmark data; values roughly like real logits (-10..15).
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 25.0 - 10.0
        })
        .collect()
}

fn main() {
    let history: Vec<u32> = (0..64).collect();
    for &vocab in &[49_152usize, 151_936] {
        for &batch in &[1usize, 16] {
            for (name, cfg) in [
                ("greedy", ProcessorConfig { prompt_length: 32, ..Default::default() }),
                (
                    "top_k=50 top_p=0.9 t=0.7",
                    ProcessorConfig {
                        do_sample: true,
                        temperature: Some(0.7),
                        top_k: Some(50),
                        top_p: Some(0.9),
                        prompt_length: 32,
                        ..Default::default()
                    },
                ),
                (
                    "top_p=0.9 only (full sort)",
                    ProcessorConfig { do_sample: true, top_p: Some(0.9), prompt_length: 32, ..Default::default() },
                ),
            ] {
                let processors = match build(&cfg, vocab) {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("{name}: {e}");
                        continue;
                    }
                };
                let base: Vec<Vec<f32>> = (0..batch).map(|r| random_logits(vocab, r as u64 + 1)).collect();
                let mut rngs: Vec<RowRng> = (0..batch).map(|r| RowRng::new(0, r as u64)).collect();
                let mut times = Vec::new();
                for _ in 0..15 {
                    let mut rows = base.clone();
                    let t0 = Instant::now();
                    for (r, row) in rows.iter_mut().enumerate() {
                        let ctx = RowContext { input_ids: &history, ignore_prefix: 0 };
                        for p in &processors {
                            p.process(&ctx, row);
                        }
                        let tok = if cfg.do_sample {
                            sample(row, &mut rngs[r], 0, r).unwrap_or(0)
                        } else {
                            kvgen::sampling::argmax(row)
                        };
                        std::hint::black_box(tok);
                    }
                    times.push(t0.elapsed().as_secs_f64() * 1e3);
                }
                times.sort_by(|a, b| a.total_cmp(b));
                println!("vocab {vocab:>6} batch {batch:>2} {name:<28} {:.3} ms/step", times[times.len() / 2]);
            }
        }
    }
}
