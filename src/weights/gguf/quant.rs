//! ggml tensor types and their dequantization to f32, bit-exact with ggml's `dequantize_row_*`
//! and the gguf Python package (same products in the same order; no fused multiply-add).

use half::{bf16, f16};
use rayon::prelude::*;

/// ggml's `enum ggml_type` (only the ids kvgen knows by name; the rest keep their number).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    BF16,
    Other(u32),
}

pub const QK_K: usize = 256;

impl GgmlType {
    pub fn from_u32(v: u32) -> GgmlType {
        match v {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            9 => GgmlType::Q8_1,
            10 => GgmlType::Q2K,
            11 => GgmlType::Q3K,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            15 => GgmlType::Q8K,
            30 => GgmlType::BF16,
            other => GgmlType::Other(other),
        }
    }

    pub fn name(self) -> String {
        match self {
            GgmlType::F32 => "F32".into(),
            GgmlType::F16 => "F16".into(),
            GgmlType::Q4_0 => "Q4_0".into(),
            GgmlType::Q4_1 => "Q4_1".into(),
            GgmlType::Q5_0 => "Q5_0".into(),
            GgmlType::Q5_1 => "Q5_1".into(),
            GgmlType::Q8_0 => "Q8_0".into(),
            GgmlType::Q8_1 => "Q8_1".into(),
            GgmlType::Q2K => "Q2_K".into(),
            GgmlType::Q3K => "Q3_K".into(),
            GgmlType::Q4K => "Q4_K".into(),
            GgmlType::Q5K => "Q5_K".into(),
            GgmlType::Q6K => "Q6_K".into(),
            GgmlType::Q8K => "Q8_K".into(),
            GgmlType::BF16 => "BF16".into(),
            GgmlType::Other(v) => format!("ggml type {v}"),
        }
    }

    /// Elements per block (0 for types whose layout kvgen does not know).
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q8_1 => 32,
            GgmlType::Q2K
            | GgmlType::Q3K
            | GgmlType::Q4K
            | GgmlType::Q5K
            | GgmlType::Q6K
            | GgmlType::Q8K => QK_K,
            GgmlType::Other(_) => 0,
        }
    }

    /// Bytes per block (0 when unknown).
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q8_1 => 36,
            GgmlType::Q2K => 84,
            GgmlType::Q3K => 110,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
            GgmlType::Q8K => 292,
            GgmlType::Other(_) => 0,
        }
    }

    /// Whether `dequantize` handles this type.
    pub fn can_dequantize(self) -> bool {
        matches!(
            self,
            GgmlType::F32
                | GgmlType::F16
                | GgmlType::BF16
                | GgmlType::Q4_0
                | GgmlType::Q4_1
                | GgmlType::Q5_0
                | GgmlType::Q5_1
                | GgmlType::Q8_0
                | GgmlType::Q4K
                | GgmlType::Q5K
                | GgmlType::Q6K
        )
    }

    /// Stored size of a tensor with these GGUF dims, or None when the row length is not a whole
    /// number of blocks (or the type is unknown: then its size cannot be known either).
    pub fn bytes_for(self, dims: &[u64], n_elements: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        let row = *dims.first()?;
        if bs == 0 || row % bs != 0 {
            return None;
        }
        (n_elements / bs).checked_mul(self.type_size() as u64)
    }
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = d * (qs[j] & 0x0F) as f32 + m;
        y[j + 16] = d * (qs[j] >> 4) as f32 + m;
    }
}

fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = (((qs[j] & 0x0F) as u32 | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
    }
}

fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = d * ((qs[j] & 0x0F) as u32 | h0) as f32 + m;
        y[j + 16] = d * ((qs[j] >> 4) as u32 | h1) as f32 + m;
    }
}

fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

/// The 8 six-bit (scale, min) pairs of a Q4_K/Q5_K super-block (ggml's `get_scale_min_k4`).
fn scale_min_k4(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
    (sc, mn)
}

fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (sc, mn) = scale_min_k4(&b[4..16]);
    let qs = &b[16..144];
    for s in 0..8 {
        let (d1, m1) = (d * sc[s] as f32, dmin * mn[s] as f32);
        let (chunk, shift) = (&qs[(s / 2) * 32..(s / 2) * 32 + 32], (s % 2) * 4);
        for l in 0..32 {
            y[s * 32 + l] = d1 * ((chunk[l] >> shift) & 0x0F) as f32 - m1;
        }
    }
}

fn q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (sc, mn) = scale_min_k4(&b[4..16]);
    let qh = &b[16..48];
    let qs = &b[48..176];
    for s in 0..8 {
        let (d1, m1) = (d * sc[s] as f32, dmin * mn[s] as f32);
        let (chunk, shift) = (&qs[(s / 2) * 32..(s / 2) * 32 + 32], (s % 2) * 4);
        for l in 0..32 {
            let q = ((chunk[l] >> shift) & 0x0F) | (((qh[l] >> s) & 1) << 4);
            y[s * 32 + l] = d1 * q as f32 - m1;
        }
    }
}

fn q6_k(b: &[u8], y: &mut [f32]) {
    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for i in 0..QK_K {
        let (half, r) = (i / 128, i % 128);
        let lo = (ql[half * 64 + r % 64] >> (4 * (r / 64))) & 0x0F;
        let hi = (qh[half * 32 + r % 32] >> (2 * (r / 32))) & 3;
        let q = (lo | (hi << 4)) as i32 - 32;
        y[i] = (d * (sc[i / 16] as i8) as f32) * q as f32;
    }
}

/// Dequantizes `bytes` (whole blocks of `kind`) into `out` (`out.len()` elements). The caller
/// checked `kind.can_dequantize()` and the sizes; a mismatch panics only through slice bounds,
/// which the loader rules out.
pub fn dequantize_into(kind: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let f: fn(&[u8], &mut [f32]) = match kind {
        GgmlType::F32 => {
            out.par_iter_mut()
                .zip(bytes.par_chunks_exact(4))
                .for_each(|(o, c)| *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            return;
        }
        GgmlType::F16 => {
            out.par_iter_mut()
                .zip(bytes.par_chunks_exact(2))
                .for_each(|(o, c)| *o = f16::from_le_bytes([c[0], c[1]]).to_f32());
            return;
        }
        GgmlType::BF16 => {
            out.par_iter_mut()
                .zip(bytes.par_chunks_exact(2))
                .for_each(|(o, c)| *o = bf16::from_le_bytes([c[0], c[1]]).to_f32());
            return;
        }
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q5_1 => q5_1,
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q4K => q4_k,
        GgmlType::Q5K => q5_k,
        GgmlType::Q6K => q6_k,
        _ => return,
    };
    let (bs, ts) = (kind.block_size(), kind.type_size());
    // Chunks of 64 blocks keep rayon's per-task overhead small.
    out.par_chunks_mut(bs * 64)
        .zip(bytes.par_chunks(ts * 64))
        .for_each(|(o, b)| {
            for (yo, bb) in o.chunks_exact_mut(bs).zip(b.chunks_exact(ts)) {
                f(bb, yo);
            }
        });
}

/// Dequantizes into a new vector; None when the type is not supported or the sizes disagree.
/// Whether `n_bytes` bytes of `kind` hold exactly `n_elements` values that `dequantize` reads.
pub fn dequantize_len_ok(kind: GgmlType, n_bytes: usize, n_elements: usize) -> bool {
    let (bs, ts) = (kind.block_size(), kind.type_size());
    kind.can_dequantize() && bs != 0 && n_elements % bs == 0 && (n_elements / bs).checked_mul(ts) == Some(n_bytes)
}

pub fn dequantize(kind: GgmlType, bytes: &[u8], n_elements: usize) -> Option<Vec<f32>> {
    if !dequantize_len_ok(kind, bytes.len(), n_elements) {
        return None;
    }
    let mut out = vec![0f32; n_elements];
    dequantize_into(kind, bytes, &mut out);
    Some(out)
}
