//! TEMPORARY naive kernels (replaced by the real module).
use crate::tensor::{Data, Matrix};
pub fn linear(x: &[f32], n: usize, w: &Matrix, bias: Option<&[f32]>, out: &mut [f32]) {
    let (rows, cols) = (w.rows, w.cols);
    let wf: Vec<f32> = match &w.data { Data::F32(b) => b.to_vec(), _ => w.data.to_f32_vec() };
    for r in 0..n { for o in 0..rows {
        let mut s = 0f32; for c in 0..cols { s += x[r*cols+c]*wf[o*cols+c]; }
        out[r*rows+o] = s + bias.map_or(0.0, |b| b[o]);
    }}
}
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, orow) in x.chunks(d).zip(out.chunks_mut(d)) {
        let ms = xr.iter().map(|v| v*v).sum::<f32>() / d as f32; let inv = 1.0/(ms+eps).sqrt();
        for i in 0..d { orow[i] = w[i]*(xr[i]*inv); }
    }
}
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) { let c = x.to_vec(); rms_norm(&c, w, eps, x); }
pub fn rope_inplace(x: &mut [f32], n_heads: usize, hd: usize, cos: &[f32], sin: &[f32]) {
    let h2 = hd/2;
    for h in 0..n_heads { let v = &mut x[h*hd..(h+1)*hd]; let c = v.to_vec();
        for i in 0..hd { let rot = if i < h2 { -c[i+h2] } else { c[i-h2] }; v[i] = c[i]*cos[i] + rot*sin[i]; } }
}
pub fn silu_mul(g: &mut [f32], u: &[f32]) { for (a,b) in g.iter_mut().zip(u) { *a = *a/(1.0+(-*a).exp()) * b; } }
pub struct AttnSeq<'a> { pub q: &'a [f32], pub k: &'a [f32], pub v: &'a [f32], pub cap: usize, pub start_pos: usize, pub n_tok: usize, pub out: &'a mut [f32] }
pub fn attention(seqs: &mut [AttnSeq], nh: usize, nkv: usize, hd: usize, window: Option<usize>, scale: f32) {
    let g = nh/nkv;
    for s in seqs.iter_mut() { for t in 0..s.n_tok { let p = s.start_pos+t; for h in 0..nh {
        let kh = h/g; let q = &s.q[(t*nh+h)*hd..(t*nh+h+1)*hd];
        let lo = match window { Some(w) => (p+1).saturating_sub(w), None => 0 };
        let sc: Vec<f32> = (lo..=p).map(|j| { let k = &s.k[(kh*s.cap+j)*hd..(kh*s.cap+j+1)*hd]; q.iter().zip(k).map(|(a,b)| a*b).sum::<f32>()*scale }).collect();
        let m = sc.iter().cloned().fold(f32::NEG_INFINITY, f32::max); let e: Vec<f32> = sc.iter().map(|x| (x-m).exp()).collect(); let z: f32 = e.iter().sum();
        let o = &mut s.out[(t*nh+h)*hd..(t*nh+h+1)*hd]; o.fill(0.0);
        for (i,j) in (lo..=p).enumerate() { let v = &s.v[(kh*s.cap+j)*hd..(kh*s.cap+j+1)*hd]; for d in 0..hd { o[d] += e[i]/z*v[d]; } }
    }}}
}
