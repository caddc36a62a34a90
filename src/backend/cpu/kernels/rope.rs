//! Rotary position embedding, HF `rotate_half` convention (halves, not interleaved pairs).

/// x = x*cos + rotate_half(x)*sin for each of `n_heads` heads of `head_dim` values, where
/// rotate_half(x) = cat(-x2, x1) and cos/sin hold `head_dim` values (HF: emb = cat(freqs, freqs)).
/// Products and sum are rounded separately (no FMA), as torch evaluates the expression.
pub fn rope_inplace(x: &mut [f32], n_heads: usize, head_dim: usize, cos: &[f32], sin: &[f32]) {
    debug_assert!(x.len() >= n_heads * head_dim);
    debug_assert!(cos.len() >= head_dim && sin.len() >= head_dim);
    let half = head_dim / 2;
    if half == 0 {
        return;
    }
    let (c1, c2) = (&cos[..half], &cos[half..2 * half]);
    let (s1, s2) = (&sin[..half], &sin[half..2 * half]);
    for h in x.chunks_exact_mut(head_dim).take(n_heads) {
        let (a, b) = h.split_at_mut(half);
        for i in 0..half {
            let (x1, x2) = (a[i], b[i]);
            a[i] = x1 * c1[i] + (-x2) * s1[i];
            b[i] = x2 * c2[i] + x1 * s2[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_matches_rotate_half() {
        let (n_heads, hd) = (3usize, 16usize);
        let x: Vec<f32> = (0..n_heads * hd).map(|i| (i as f32 * 0.37).sin()).collect();
        let pos = 5.0f64;
        let freqs: Vec<f64> = (0..hd / 2)
            .map(|i| pos / 10000f64.powf(2.0 * i as f64 / hd as f64))
            .collect();
        let emb: Vec<f64> = freqs.iter().chain(freqs.iter()).copied().collect();
        let cos: Vec<f32> = emb.iter().map(|e| e.cos() as f32).collect();
        let sin: Vec<f32> = emb.iter().map(|e| e.sin() as f32).collect();
        let mut y = x.clone();
        rope_inplace(&mut y, n_heads, hd, &cos, &sin);
        for h in 0..n_heads {
            let q = &x[h * hd..(h + 1) * hd];
            let rot: Vec<f32> = (0..hd)
                .map(|i| {
                    if i < hd / 2 {
                        -q[i + hd / 2]
                    } else {
                        q[i - hd / 2]
                    }
                })
                .collect();
            for i in 0..hd {
                let want = q[i] * cos[i] + rot[i] * sin[i];
                assert_eq!(y[h * hd + i].to_bits(), want.to_bits(), "h={h} i={i}");
            }
        }
    }
}
