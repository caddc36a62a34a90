//! `device="neuron"`: kvgen's orchestration of the exported graphs (which graph a step runs, the
//! padding, positions, cache rows) over an executor (libnrt, or XLA:CPU on the same bytes).
//!
//! Each sequence owns one cache row (a slot) of every layer's K/V cache tensor. A prompt runs the
//! smallest context-encoding graph that holds it (right-padded: the padded positions are written
//! but never visible, and the next tokens overwrite them). Decoding sequences run together in the
//! smallest token-generation graph whose batch covers their rows and whose bucket covers their
//! positions; rows not decoding in that step get position max_context-1, a position no sequence
//! sees before writing it itself. Logits come back vocab-split per rank and are concatenated here;
//! sampling stays on the host in f32 (the shared sampler, which catches NaN).

use std::path::PathBuf;
use std::sync::Mutex;

use super::executor::{Executor, ExecutorKind};
use super::export::{all_rank_tensors, build_set, plan_set, write_set, SetOptions, SetPlan};
use super::manifest::{Manifest, Role};
use super::record::RankTensors;
use crate::backend::{check_token, Backend, MemoryStats, SeqInput, SlotId};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::host::HostWeights;
use crate::model::tp::TpPlan;

/// How `device="neuron"` loads (from `Generator.from_pretrained`).
#[derive(Clone, Debug)]
pub struct NeuronOptions {
    pub executor: ExecutorKind,
    /// An export (manifest.json + graphs, and NEFFs once compiled); None: record the graphs into
    /// a temporary directory (enough for the XLA:CPU executor).
    pub dir: Option<PathBuf>,
    pub set: SetOptions,
    /// The command that starts the XLA:CPU worker (python, its script).
    pub xla_worker: Vec<String>,
}

struct Slot {
    capacity: usize,
    /// Tokens in the cache row so far (a prompt continued mid-sequence is encoded again whole).
    tokens: Vec<u32>,
}

struct State {
    exec: Box<dyn Executor>,
    slots: Vec<Option<Slot>>,
}

pub struct NeuronBackend {
    cfg: ModelConfig,
    plan: SetPlan,
    manifest: Manifest,
    state: Mutex<State>,
    weight_bytes_per_rank: usize,
    cache_bytes_per_position: usize,
    /// Keeps a recorded set's temporary directory alive.
    _scratch: Option<ScratchDir>,
}

/// A directory removed when dropped.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch_dir() -> Result<ScratchDir> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("kvgen-neuron-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    Ok(ScratchDir(dir))
}

impl NeuronBackend {
    pub fn new(cfg: &ModelConfig, tp: &TpPlan, shards: Vec<HostWeights>, opts: &NeuronOptions) -> Result<NeuronBackend> {
        let mut set = opts.set.clone();
        let existing = match &opts.dir {
            Some(d) if d.join(super::manifest::FILE_NAME).is_file() => Some(Manifest::read(d)?),
            _ => None,
        };
        if let Some(m) = &existing {
            // The export decides the set; its graphs must be what this checkpoint records.
            set = SetOptions {
                tp_degree: set.tp_degree,
                batch_sizes: m.batch_sizes.clone(),
                buckets: Some(m.buckets.clone()),
                max_context: Some(m.max_context),
                dtype: m.tensors.iter().find(|t| t.role == Role::Cache).map_or(set.dtype, |t| t.spec.dtype),
            };
            if m.tp_degree != set.tp_degree {
                return Err(Error::invalid(format!(
                    "the Neuron export in {} is for tp_degree={}, not tp_degree={}; pass tp_degree={} or export again",
                    opts.dir.as_deref().unwrap_or(std::path::Path::new("")).display(),
                    m.tp_degree,
                    set.tp_degree,
                    m.tp_degree
                )));
            }
        }
        let plan = plan_set(cfg, &set)?;
        let ranks = all_rank_tensors(cfg, tp, shards, &plan.shape, true)?;
        let (manifest, modules) = build_set(cfg, &ranks[0], &plan)?;
        let (dir, scratch) = match (&opts.dir, &existing) {
            (Some(d), Some(m)) => {
                check_same_graphs(d, m, &manifest)?;
                if opts.executor == ExecutorKind::XlaCpu {
                    check_files(d, m)?;
                }
                (d.clone(), None)
            }
            (Some(d), None) if opts.executor == ExecutorKind::XlaCpu => {
                write_set(d, &manifest, &modules)?;
                (d.clone(), None)
            }
            (None, _) if opts.executor == ExecutorKind::XlaCpu => {
                let s = scratch_dir()?;
                write_set(&s.0, &manifest, &modules)?;
                (s.0.clone(), Some(s))
            }
            _ => {
                return Err(Error::BackendUnavailable(format!(
                    "device=\"neuron\" runs compiled graphs: export and compile them once, then pass their directory as \
                     neuron_dir=: `python -m kvgen neuron export MODEL DIR --tp-degree {}` and, on a Neuron host, \
                     `python -m kvgen neuron compile DIR` (or neuron_executor=\"xla-cpu\" to run the graphs on the CPU)",
                    set.tp_degree
                )))
            }
        };
        // A compiled export keeps its NEFF names.
        let manifest = match existing {
            Some(m) => m,
            None => manifest,
        };
        let mut exec = make_executor(opts, set.tp_degree)?;
        let weight_bytes_per_rank = manifest.memory_per_rank.weights as usize;
        let cache_bytes_per_position = ranks[0].model.cache_bytes_per_position(plan.shape.dtype.size());
        upload(exec.as_mut(), ranks)?;
        exec.load(&manifest, &dir)?;
        let slots = (0..plan.shape.max_batch).map(|_| None).collect();
        Ok(NeuronBackend {
            cfg: cfg.clone(),
            plan,
            manifest,
            state: Mutex::new(State { exec, slots }),
            weight_bytes_per_rank,
            cache_bytes_per_position,
            _scratch: scratch,
        })
    }

    fn state(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| Error::Internal("the Neuron backend's state was poisoned by a panic".into()))
    }

    /// Runs `graph` with the same step inputs on every rank; returns each output row's logits,
    /// the ranks' vocabulary shards concatenated in rank order (padding rows dropped).
    fn run(&self, st: &mut State, graph: &str, inputs: Vec<Vec<u8>>, rows: usize) -> Result<Vec<f32>> {
        let ranks = self.plan.shape.ranks;
        let per_rank = vec![inputs; ranks];
        let outs = st.exec.run(graph, &per_rank)?;
        let vocab = self.cfg.vocab_size;
        let chunk = vocab.div_ceil(ranks);
        let mut logits = vec![0f32; rows * vocab];
        for (r, out) in outs.iter().enumerate() {
            let bytes = out.first().ok_or_else(|| Error::Backend(format!("rank {r} returned no logits for {graph}")))?;
            if bytes.len() != rows * chunk * 4 {
                return Err(Error::Backend(format!("rank {r} returned {} logit bytes for {graph}, expected {}", bytes.len(), rows * chunk * 4)));
            }
            for row in 0..rows {
                let lo = r * chunk;
                let hi = ((r + 1) * chunk).min(vocab);
                for (j, c) in (lo..hi).enumerate() {
                    let at = (row * chunk + j) * 4;
                    logits[row * vocab + c] = f32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
                }
            }
        }
        Ok(logits)
    }

    fn bucket_for(&self, len: usize) -> Result<usize> {
        self.plan.buckets.iter().copied().find(|&b| b >= len).ok_or_else(|| {
            Error::ContextOverflow(format!(
                "{len} positions do not fit the Neuron graphs' max_context={}; export with a larger max_context",
                self.plan.shape.max_context
            ))
        })
    }

    fn encode(&self, st: &mut State, slot: usize, tokens: &[u32]) -> Result<Vec<f32>> {
        let bucket = self.bucket_for(tokens.len())?;
        let mut ids = vec![0i32; bucket];
        for (d, &t) in ids.iter_mut().zip(tokens) {
            *d = t as i32;
        }
        let inputs = vec![i32_bytes(&ids), i32_bytes(&[slot as i32]), i32_bytes(&[tokens.len() as i32 - 1])];
        self.run(st, &format!("cte_b1_n{bucket}"), inputs, 1)
    }
}

fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The export's graphs must be byte-identical to what this checkpoint and kvgen record.
fn check_same_graphs(dir: &std::path::Path, export: &Manifest, recorded: &Manifest) -> Result<()> {
    let stale = export.graphs.len() != recorded.graphs.len()
        || export.graphs.iter().zip(&recorded.graphs).any(|(a, b)| a.name != b.name || a.sha256 != b.sha256);
    if stale {
        return Err(Error::BadModelFile {
            path: dir.join(super::manifest::FILE_NAME),
            message: format!(
                "the Neuron export was made from another model, tp_degree or kvgen version ({}): its graphs differ from \
                 what this checkpoint records now; export again (and compile) into this directory",
                export.kvgen_version
            ),
        });
    }
    Ok(())
}

/// The graph files on disk are the ones the manifest describes (the XLA:CPU worker reads them).
fn check_files(dir: &std::path::Path, m: &Manifest) -> Result<()> {
    for g in &m.graphs {
        let path = dir.join(&g.file);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        if super::export::sha256_hex(&bytes) != g.sha256 {
            return Err(Error::BadModelFile {
                path,
                message: "this graph file differs from the one manifest.json describes (sha256); export again".into(),
            });
        }
    }
    Ok(())
}

fn make_executor(opts: &NeuronOptions, ranks: usize) -> Result<Box<dyn Executor>> {
    match opts.executor {
        ExecutorKind::XlaCpu => Ok(Box::new(super::xla_cpu::XlaCpuExecutor::start(&opts.xla_worker, ranks)?)),
        ExecutorKind::Nrt => Ok(Box::new(super::nrt::NrtExecutor::open(ranks)?)),
    }
}

/// Each rank's weights and tables once, and its zeroed caches; each tensor's bytes exist only
/// while it is uploaded.
fn upload(exec: &mut dyn Executor, ranks: Vec<RankTensors>) -> Result<()> {
    for (r, rank) in ranks.into_iter().enumerate() {
        for (t, v) in rank.tensors.iter().zip(rank.values) {
            let bytes = v.map(|v| v.into_bytes()).transpose()?;
            exec.put(r, &t.spec, bytes.as_deref())?;
        }
    }
    Ok(())
}

impl Backend for NeuronBackend {
    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn allocate(&self, capacity: usize) -> Result<SlotId> {
        let s = self.plan.shape.max_context;
        if capacity > s {
            return Err(Error::ContextOverflow(format!(
                "a sequence of up to {capacity} positions does not fit the Neuron graphs' max_context={s}; shorten the \
                 prompt or max_new_tokens, or export with a larger max_context"
            )));
        }
        let mut st = self.state()?;
        let free = st.slots.iter().position(|x| x.is_none()).ok_or_else(|| {
            Error::invalid(format!(
                "all {} Neuron cache rows are in use: the graphs were exported for batches of up to {}; generate fewer \
                 rows at once or export with larger batch_sizes",
                self.plan.shape.max_batch, self.plan.shape.max_batch
            ))
        })?;
        st.slots[free] = Some(Slot { capacity, tokens: Vec::with_capacity(capacity) });
        Ok(free)
    }

    fn release(&self, slot: SlotId) {
        if let Ok(mut st) = self.state() {
            if let Some(s) = st.slots.get_mut(slot) {
                *s = None;
            }
        }
    }

    fn cache_bytes_per_position(&self) -> usize {
        self.cache_bytes_per_position
    }

    fn cache_bytes_reserved(&self) -> usize {
        self.cache_bytes_per_position * self.plan.shape.max_batch * self.plan.shape.max_context
    }

    fn max_sequences(&self) -> Option<usize> {
        Some(self.plan.shape.max_batch)
    }

    fn step(&self, seqs: &[SeqInput], all_positions: bool) -> Result<Vec<f32>> {
        if all_positions {
            return Err(Error::invalid(
                "logits for every prompt position are not available on device=\"neuron\" (its graphs return the last \
                 position's); drop the option that asks for prompt logits, or use device=\"cpu\"",
            ));
        }
        let vocab = self.cfg.vocab_size;
        let mut st = self.state()?;
        let mut out = vec![0f32; seqs.len() * vocab];
        let mut decode = vec![];
        for (i, s) in seqs.iter().enumerate() {
            for (p, &t) in s.tokens.iter().enumerate() {
                check_token(t, i, s.start_pos + p, vocab)?;
            }
            let slot = st.slots.get_mut(s.slot).and_then(|x| x.as_mut()).ok_or_else(|| Error::Internal(format!("slot {} is not allocated", s.slot)))?;
            if s.start_pos > slot.tokens.len() || s.start_pos + s.tokens.len() > slot.capacity {
                return Err(Error::Internal(format!(
                    "a step at position {} of {} tokens for a slot holding {} of {}",
                    s.start_pos,
                    s.tokens.len(),
                    slot.tokens.len(),
                    slot.capacity
                )));
            }
            slot.tokens.truncate(s.start_pos);
            slot.tokens.extend_from_slice(s.tokens);
            if s.tokens.len() == 1 && s.start_pos > 0 {
                decode.push(i);
            } else {
                let tokens = slot.tokens.clone();
                let logits = self.encode(&mut st, s.slot, &tokens)?;
                out[i * vocab..(i + 1) * vocab].copy_from_slice(&logits);
            }
        }
        if !decode.is_empty() {
            let rows = decode.iter().map(|&i| seqs[i].slot + 1).max().unwrap_or(1);
            let batch = self.plan.batch_sizes.iter().copied().find(|&b| b >= rows).ok_or_else(|| Error::Internal(format!("no batch bucket for {rows} rows")))?;
            let longest = decode.iter().map(|&i| seqs[i].start_pos + 1).max().unwrap_or(1);
            let bucket = self.bucket_for(longest)?;
            let idle = self.plan.shape.max_context as i32 - 1;
            let (mut ids, mut pos) = (vec![0i32; batch], vec![idle; batch]);
            for &i in &decode {
                ids[seqs[i].slot] = seqs[i].tokens[0] as i32;
                pos[seqs[i].slot] = seqs[i].start_pos as i32;
            }
            let logits = self.run(&mut st, &format!("tkg_b{batch}_n{bucket}"), vec![i32_bytes(&ids), i32_bytes(&pos)], batch)?;
            for &i in &decode {
                let row = seqs[i].slot;
                out[i * vocab..(i + 1) * vocab].copy_from_slice(&logits[row * vocab..(row + 1) * vocab]);
            }
        }
        Ok(out)
    }

    fn debug_tensor(&self, name: &str) -> Result<Vec<Vec<u8>>> {
        let mut st = self.state()?;
        (0..self.plan.shape.ranks).map(|r| st.exec.fetch(r, name)).collect()
    }

    fn memory_stats(&self) -> MemoryStats {
        MemoryStats {
            tp_degree: self.plan.shape.ranks,
            weight_bytes_per_rank: self.weight_bytes_per_rank,
            kv_cache_bytes_per_token: self.cache_bytes_per_position,
            all_reduces: 0,
        }
    }
}

impl NeuronBackend {
    /// The manifest of the graphs this backend runs.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
}
