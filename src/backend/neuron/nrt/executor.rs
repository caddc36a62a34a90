//! `NrtExecutor`: the `Executor` on libnrt. Persistent tensors (weights, tables, caches) are
//! allocated once per rank by `put`; `load` loads each graph's NEFF on every rank together,
//! checks its tensor list against the manifest and allocates the graph's step I/O; the first
//! `run` of a graph binds its input and output sets once (a cache bound to the same tensor in
//! both: must-alias, updated in place); each `run` executes every rank at once under a watchdog.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ffi::{Api, NrtModel, NrtTensor, NrtTensorSet};
use super::handles::{read_raw, write_raw, Model, Tensor, TensorSet};
use super::plan::{self, Binding};
use super::runtime::Session;
use super::status::{self, Site};
use super::workers::{Job, Outcome, RankFailure, Workers};
use crate::backend::neuron::executor::Executor;
use crate::backend::neuron::manifest::{GraphEntry, Manifest, Role, TensorSpec, FILE_NAME};
use crate::error::{Error, Result};

pub const ENV_EXEC_TIMEOUT: &str = "KVGEN_NEURON_EXEC_TIMEOUT";
/// Added to the runtime's own timeout so that, when libnrt times out, its NRT_TIMEOUT is what
/// the user sees, and kvgen's watchdog only catches a rank that never returns at all.
const WATCHDOG_MARGIN_S: f64 = 10.0;

/// How long `run` waits for every rank: `KVGEN_NEURON_EXEC_TIMEOUT` seconds, else the runtime's
/// `NEURON_RT_EXEC_TIMEOUT` (default 30) plus a margin.
pub fn exec_timeout() -> Result<Duration> {
    if let Ok(v) = std::env::var(ENV_EXEC_TIMEOUT) {
        return match v.trim().parse::<f64>() {
            Ok(s) if s.is_finite() && s > 0.0 => Ok(Duration::from_secs_f64(s)),
            _ => Err(Error::invalid(format!("{ENV_EXEC_TIMEOUT}={v:?} is not a number of seconds > 0"))),
        };
    }
    let runtime = std::env::var("NEURON_RT_EXEC_TIMEOUT").ok().and_then(|v| v.trim().parse::<f64>().ok());
    let base = runtime.filter(|s| s.is_finite() && *s > 0.0).unwrap_or(30.0);
    Ok(Duration::from_secs_f64(base + WATCHDOG_MARGIN_S))
}

/// A raw handle moved into a rank job. Safety: the executor frees handles only after every rank
/// worker is idle (see `Drop`), so a job never sees a freed one.
struct Ptr<T>(*mut T);
unsafe impl<T> Send for Ptr<T> {}
impl<T> Ptr<T> {
    // A method (not `.0`) so closures capture the whole Send wrapper.
    fn get(&self) -> *mut T {
        self.0
    }
}

struct LoadedGraph {
    entry: GraphEntry,
    binding: Binding,
}

/// One rank's step tensors of one graph: its `Role::Step` inputs and its non-aliased outputs,
/// each in graph order.
struct StepTensors {
    inputs: Vec<Tensor>,
    outputs: Vec<Tensor>,
}

struct RankSets {
    input: TensorSet,
    output: TensorSet,
}

/// Every libnrt handle of the executor. Field order is drop order: sets, then tensors, then
/// models (the session, and with the last one nrt_close, follows when the last handle is gone).
#[derive(Default)]
struct Handles {
    sets: HashMap<String, Vec<RankSets>>,
    steps: HashMap<String, Vec<StepTensors>>,
    persistent: Vec<HashMap<String, Tensor>>,
    models: HashMap<String, Vec<Model>>,
    graphs: HashMap<String, LoadedGraph>,
}

pub struct NrtExecutor {
    handles: Option<Handles>,
    workers: Workers,
    session: Arc<Session>,
    tp: usize,
}

impl NrtExecutor {
    /// Opens libnrt (`KVGEN_LIBNRT`, the SDK path, the loader path) and starts the runtime on
    /// NeuronCores `0..tp_degree`.
    pub fn open(tp_degree: usize) -> Result<Self> {
        let session = Session::open(tp_degree)?;
        let workers = Workers::spawn(tp_degree)?;
        let handles = Handles { persistent: (0..tp_degree).map(|_| HashMap::new()).collect(), ..Default::default() };
        Ok(NrtExecutor { handles: Some(handles), workers, session, tp: tp_degree })
    }

    /// The library in use and its version, for logs.
    pub fn runtime_description(&self) -> String {
        let api = self.session.api;
        match api.version() {
            Some(v) => format!("libnrt {v} ({})", api.path),
            None => format!("libnrt ({})", api.path),
        }
    }

    fn handles(&mut self) -> Result<&mut Handles> {
        self.handles.as_mut().ok_or_else(|| Error::Internal("the nrt executor was already closed".into()))
    }
}

fn persistent<'a>(
    persistent: &'a [HashMap<String, Tensor>],
    rank: usize,
    spec: &TensorSpec,
    graph: &str,
) -> Result<&'a Tensor> {
    let t = persistent[rank].get(&spec.name).ok_or_else(|| {
        Error::Internal(format!("tensor {} was not put on rank {rank} before graph {graph} ran", spec.name))
    })?;
    if t.bytes != spec.byte_len() {
        return Err(Error::Internal(format!(
            "tensor {} on rank {rank} is {} bytes; graph {graph} reads shape {:?} {:?} = {} bytes",
            spec.name,
            t.bytes,
            spec.shape,
            spec.dtype,
            spec.byte_len()
        )));
    }
    Ok(t)
}

/// The input and output sets of `g` on every rank: step tensors, persistent tensors by name, and
/// each aliased output bound to the very tensor its input is.
fn build_sets(
    session: &Arc<Session>,
    g: &LoadedGraph,
    steps: &[StepTensors],
    tensors: &[HashMap<String, Tensor>],
) -> Result<Vec<RankSets>> {
    let entry = &g.entry;
    let mut out = Vec::with_capacity(steps.len());
    for (rank, step) in steps.iter().enumerate() {
        let mut input = TensorSet::new(session, rank)?;
        let mut step_in = step.inputs.iter();
        for (inp, name) in entry.inputs.iter().zip(&g.binding.inputs) {
            let t = match inp.role {
                Role::Step => step_in.next().ok_or_else(|| Error::Internal("step inputs out of step".into()))?,
                _ => persistent(tensors, rank, &inp.spec, &entry.name)?,
            };
            input.add(name, t)?;
        }
        let mut output = TensorSet::new(session, rank)?;
        let mut step_out = step.outputs.iter();
        for (o, name) in entry.outputs.iter().zip(&g.binding.outputs) {
            let t = match &o.aliases {
                Some(target) => {
                    // check_aliases ran at load: the target is a persistent input of this graph.
                    let inp =
                        entry.inputs.iter().find(|i| &i.spec.name == target).ok_or_else(|| {
                            Error::Internal(format!("alias {target} of graph {} vanished", entry.name))
                        })?;
                    persistent(tensors, rank, &inp.spec, &entry.name)?
                }
                None => step_out.next().ok_or_else(|| Error::Internal("step outputs out of step".into()))?,
            };
            output.add(name, t)?;
        }
        out.push(RankSets { input, output });
    }
    Ok(out)
}

/// Loads `neff` on every rank at once (ranks exchange information during the load and would
/// wait for each other forever if loaded one after another).
fn load_all_ranks(session: &Arc<Session>, neff: &[u8], tp: usize, what: &str) -> Result<Vec<Model>> {
    let results: Vec<Result<Model>> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..tp).map(|rank| s.spawn(move || Model::load(session, neff, rank, tp, what))).collect();
        threads
            .into_iter()
            .enumerate()
            .map(|(rank, t)| {
                t.join().unwrap_or_else(|p| {
                    Err(Error::Internal(format!("loading rank {rank}: {}", crate::error::panic_message(p.as_ref()))))
                })
            })
            .collect()
    });
    let mut models = Vec::with_capacity(tp);
    let mut first_err = None;
    for r in results {
        match r {
            Ok(m) => models.push(m),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(models),
    }
}

fn rank_job(
    api: &'static Api,
    rank: usize,
    graph: String,
    model: Ptr<NrtModel>,
    sets: (Ptr<NrtTensorSet>, Ptr<NrtTensorSet>),
    writes: Vec<(Ptr<NrtTensor>, Vec<u8>, String)>,
    reads: Vec<(Ptr<NrtTensor>, usize, String)>,
) -> Job {
    let fail = |error: Error| RankFailure { error, timeout: false };
    Box::new(move || {
        for (t, data, what) in &writes {
            // SAFETY: the graph's step tensor (see Ptr), and run checked data against its size.
            unsafe { write_raw(api, t.get(), rank, data, what) }.map_err(fail)?;
        }
        // SAFETY: a loaded model and its two built sets, alive while this job runs (see Ptr).
        let code = unsafe { (api.execute)(model.get(), sets.0.get(), sets.1.get()) };
        if code != status::SUCCESS {
            let what = format!("graph {graph}");
            return Err(RankFailure {
                error: status::error(code, &Site { call: "nrt_execute", rank, what: &what }),
                timeout: code == status::TIMEOUT,
            });
        }
        // SAFETY: the graph's output tensors (see Ptr), read within their size.
        reads
            .iter()
            .map(|(t, bytes, what)| unsafe { read_raw(api, t.get(), rank, *bytes, what) }.map_err(fail))
            .collect()
    })
}

fn rank_list(ranks: &[usize]) -> String {
    let names: Vec<String> = ranks.iter().map(|r| r.to_string()).collect();
    format!("{} {}", if ranks.len() == 1 { "rank" } else { "ranks" }, names.join(", "))
}

impl Executor for NrtExecutor {
    fn ranks(&self) -> usize {
        self.tp
    }

    fn put(&mut self, rank: usize, spec: &TensorSpec, data: Option<&[u8]>) -> Result<()> {
        let tp = self.tp;
        let session = self.session.clone();
        let h = self.handles()?;
        if rank >= tp {
            return Err(Error::Internal(format!("put of {} on rank {rank}; the executor has {tp} ranks", spec.name)));
        }
        if h.persistent[rank].contains_key(&spec.name) {
            return Err(Error::Internal(format!("tensor {} put twice on rank {rank}", spec.name)));
        }
        let bytes = spec.byte_len();
        if let Some(d) = data {
            if d.len() != bytes {
                return Err(Error::Internal(format!(
                    "tensor {} on rank {rank}: {} bytes given, shape {:?} {:?} is {bytes} bytes",
                    spec.name,
                    d.len(),
                    spec.shape,
                    spec.dtype
                )));
            }
        }
        let t = Tensor::allocate(&session, rank, bytes, &spec.name)?;
        match data {
            Some(d) => t.write(d)?,
            None => t.zero()?,
        }
        h.persistent[rank].insert(spec.name.clone(), t);
        Ok(())
    }

    fn load(&mut self, manifest: &Manifest, dir: &Path) -> Result<()> {
        let tp = self.tp;
        let session = self.session.clone();
        if manifest.tp_degree != tp {
            return Err(Error::bad_file(
                dir.join(FILE_NAME),
                format!("the export is for tp_degree={}, this executor runs {tp} ranks", manifest.tp_degree),
            ));
        }
        let h = self.handles()?;
        for graph in &manifest.graphs {
            if h.graphs.contains_key(&graph.name) {
                return Err(Error::Internal(format!("graph {} loaded twice", graph.name)));
            }
            plan::check_aliases(graph, &dir.join(FILE_NAME))?;
            let compile = format!("run `python -m kvgen neuron compile {}` first", dir.display());
            let rel = graph.neff.as_ref().ok_or_else(|| {
                Error::BackendUnavailable(format!(
                    "graph {} of {} has no compiled NEFF; {compile}",
                    graph.name,
                    dir.display()
                ))
            })?;
            let path = dir.join(rel);
            let neff = std::fs::read(&path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::BackendUnavailable(format!(
                    "{} (the NEFF of graph {}) does not exist; {compile}",
                    path.display(),
                    graph.name
                )),
                _ => Error::io(&path, e),
            })?;
            let what = format!("graph {} from {}", graph.name, path.display());
            let models = load_all_ranks(&session, &neff, tp, &what)?;
            let mut binding: Option<Binding> = None;
            for m in &models {
                let b = plan::bind(graph, &m.tensor_info(&what)?, &path)?;
                if binding.as_ref().is_some_and(|prev| prev != &b) {
                    return Err(Error::bad_file(
                        &path,
                        format!("rank {} reports other tensor names than rank 0", m.rank),
                    ));
                }
                binding = Some(b);
            }
            let binding = binding.ok_or_else(|| Error::Internal("no rank loaded".into()))?;
            let mut steps = Vec::with_capacity(tp);
            for rank in 0..tp {
                let mut inputs = Vec::new();
                for (inp, name) in graph.inputs.iter().zip(&binding.inputs).filter(|(i, _)| i.role == Role::Step) {
                    inputs.push(Tensor::allocate(&session, rank, inp.spec.byte_len(), name)?);
                }
                let mut outputs = Vec::new();
                for (o, name) in graph.outputs.iter().zip(&binding.outputs).filter(|(o, _)| o.aliases.is_none()) {
                    outputs.push(Tensor::allocate(&session, rank, o.spec.byte_len(), name)?);
                }
                steps.push(StepTensors { inputs, outputs });
            }
            h.models.insert(graph.name.clone(), models);
            h.steps.insert(graph.name.clone(), steps);
            h.graphs.insert(graph.name.clone(), LoadedGraph { entry: graph.clone(), binding });
        }
        Ok(())
    }

    fn run(&mut self, graph: &str, inputs: &[Vec<Vec<u8>>]) -> Result<Vec<Vec<Vec<u8>>>> {
        let timeout = exec_timeout()?;
        let busy = self.workers.settle(Instant::now() + timeout);
        if !busy.is_empty() {
            return Err(Error::Backend(format!(
                "{} still inside nrt_execute from an earlier step after a further {:.1} s; the NeuronCore may be \
                 hung (see `neuron-top` and the kernel log); retry later or restart the process",
                rank_list(&busy),
                timeout.as_secs_f64()
            )));
        }
        let tp = self.tp;
        let session = self.session.clone();
        let h = self.handles.as_mut().ok_or_else(|| Error::Internal("the nrt executor was already closed".into()))?;
        let g = h.graphs.get(graph).ok_or_else(|| Error::Internal(format!("graph {graph} was not loaded")))?;
        let step_specs: Vec<&TensorSpec> =
            g.entry.inputs.iter().filter(|i| i.role == Role::Step).map(|i| &i.spec).collect();
        if inputs.len() != tp {
            return Err(Error::Internal(format!(
                "graph {graph}: inputs for {} ranks, the executor has {tp}",
                inputs.len()
            )));
        }
        for (rank, rank_inputs) in inputs.iter().enumerate() {
            if rank_inputs.len() != step_specs.len() {
                return Err(Error::Internal(format!(
                    "graph {graph} rank {rank}: {} step inputs given, the graph has {}",
                    rank_inputs.len(),
                    step_specs.len()
                )));
            }
            for (data, spec) in rank_inputs.iter().zip(&step_specs) {
                if data.len() != spec.byte_len() {
                    return Err(Error::Internal(format!(
                        "graph {graph} rank {rank}: step input {} is {} bytes, shape {:?} {:?} is {} bytes",
                        spec.name,
                        data.len(),
                        spec.shape,
                        spec.dtype,
                        spec.byte_len()
                    )));
                }
            }
        }
        let steps = h.steps.get(graph).ok_or_else(|| Error::Internal(format!("no step tensors for {graph}")))?;
        if !h.sets.contains_key(graph) {
            let sets = build_sets(&session, g, steps, &h.persistent)?;
            h.sets.insert(graph.to_string(), sets);
        }
        let sets = h.sets.get(graph).ok_or_else(|| Error::Internal(format!("no sets for {graph}")))?;
        let models = h.models.get(graph).ok_or_else(|| Error::Internal(format!("no models for {graph}")))?;
        let jobs: Vec<Job> = (0..tp)
            .map(|rank| {
                let step = &steps[rank];
                let writes = step
                    .inputs
                    .iter()
                    .zip(&inputs[rank])
                    .map(|(t, d)| (Ptr(t.raw()), d.clone(), format!("step input '{}' of graph {graph}", t.name)))
                    .collect();
                let reads = step
                    .outputs
                    .iter()
                    .map(|t| (Ptr(t.raw()), t.bytes, format!("output '{}' of graph {graph}", t.name)))
                    .collect();
                let set = &sets[rank];
                rank_job(
                    session.api,
                    rank,
                    graph.to_string(),
                    Ptr(models[rank].raw()),
                    (Ptr(set.input.raw()), Ptr(set.output.raw())),
                    writes,
                    reads,
                )
            })
            .collect();
        match self.workers.run(jobs, Instant::now() + timeout)? {
            Outcome::Late(late) => Err(Error::Backend(format!(
                "{} did not answer within {:.1} s ({ENV_EXEC_TIMEOUT}) running graph {graph}; the step is lost, the \
                 next step first waits for {} to come back",
                rank_list(&late),
                timeout.as_secs_f64(),
                if late.len() == 1 { "it" } else { "them" }
            ))),
            Outcome::Done(results) => {
                let mut outputs = Vec::with_capacity(tp);
                let mut failures = Vec::new();
                for r in results {
                    match r {
                        Ok(o) => outputs.push(o),
                        Err(f) => failures.push(f),
                    }
                }
                // A rank's own fault explains a peer's NRT_TIMEOUT, so it is the one reported.
                let pick = failures.iter().position(|f| !f.timeout).unwrap_or(0);
                match failures.into_iter().nth(pick) {
                    Some(f) => Err(f.error),
                    None => Ok(outputs),
                }
            }
        }
    }
}

impl Drop for NrtExecutor {
    fn drop(&mut self) {
        let grace = exec_timeout().unwrap_or(Duration::from_secs(40));
        let handles = self.handles.take();
        if self.workers.shutdown(grace) {
            drop(handles);
        } else {
            // A rank is still inside nrt_execute with these handles: freeing them under it would
            // be a use-after-free in the runtime. Leak them instead (and so never nrt_close).
            std::mem::forget(handles);
        }
    }
}
