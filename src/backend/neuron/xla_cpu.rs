//! `neuron_executor="xla-cpu"`: the exported `.hlo.pb` bytes run on XLA's CPU backend (jaxlib
//! 0.10.2), one host device per rank, in a worker process (`python/kvgen/_neuron_xla.py`): a
//! malformed graph that crashes XLA takes the worker down, not the caller, and the worker sets
//! XLA's device count before jax starts (the caller may have imported jax already).
//!
//! Wire format, both ways: u32 LE header length, the JSON header, u32 LE blob count, then each
//! blob as u64 LE length + bytes. Answers carry `{"ok": true}` or `{"ok": false, "error": ...}`.

use std::io::{BufReader, BufWriter, Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use super::executor::Executor;
use super::manifest::{Manifest, TensorSpec};
use crate::error::{Error, Result};

pub struct XlaCpuExecutor {
    child: Child,
    to: BufWriter<ChildStdin>,
    from: BufReader<ChildStdout>,
    /// The worker's last stderr output, for errors when it dies.
    stderr: Arc<Mutex<String>>,
    ranks: usize,
}

const STDERR_KEEP: usize = 8000;

impl XlaCpuExecutor {
    /// Starts the worker (`command`: the interpreter and the worker script) for `ranks` devices.
    pub fn start(command: &[String], ranks: usize) -> Result<Self> {
        let (prog, args) = command.split_first().ok_or_else(|| Error::invalid("no command for the XLA:CPU worker"))?;
        let flags = std::env::var("XLA_FLAGS").unwrap_or_default();
        let mut child = Command::new(prog)
            .args(args)
            .env("XLA_FLAGS", format!("{flags} --xla_force_host_platform_device_count={ranks}").trim())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::BackendUnavailable(format!("cannot start the XLA:CPU worker {command:?}: {e}")))?;
        let (Some(stdin), Some(stdout), Some(mut err)) = (child.stdin.take(), child.stdout.take(), child.stderr.take()) else {
            return Err(Error::Internal("the XLA:CPU worker has no pipes".into()));
        };
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                    if s.len() > STDERR_KEEP {
                        let cut = s.len() - STDERR_KEEP;
                        let cut = (cut..s.len()).find(|&i| s.is_char_boundary(i)).unwrap_or(cut);
                        s.drain(..cut);
                    }
                }
            }
        });
        let mut exec = XlaCpuExecutor { child, to: BufWriter::new(stdin), from: BufReader::new(stdout), stderr, ranks };
        exec.call(json!({"op": "hello", "ranks": ranks}), &[]).map_err(|e| match e {
            Error::Backend(m) => Error::BackendUnavailable(format!(
                "the XLA:CPU executor needs jax==0.10.2 and jaxlib==0.10.2 (pip install \"jax==0.10.2\" \"jaxlib==0.10.2\"): {m}"
            )),
            other => other,
        })?;
        Ok(exec)
    }

    fn died(&mut self, what: &str) -> Error {
        let status = self.child.try_wait().ok().flatten().map(|s| s.to_string()).unwrap_or_else(|| "still running".into());
        let tail = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
        Error::Backend(format!("the XLA:CPU worker failed while {what} ({status}); its output:\n{tail}"))
    }

    fn send(&mut self, header: &Value, blobs: &[&[u8]]) -> std::io::Result<()> {
        let h = header.to_string();
        self.to.write_all(&(h.len() as u32).to_le_bytes())?;
        self.to.write_all(h.as_bytes())?;
        self.to.write_all(&(blobs.len() as u32).to_le_bytes())?;
        for b in blobs {
            self.to.write_all(&(b.len() as u64).to_le_bytes())?;
            self.to.write_all(b)?;
        }
        self.to.flush()
    }

    fn receive(&mut self) -> std::io::Result<(Value, Vec<Vec<u8>>)> {
        let mut n4 = [0u8; 4];
        self.from.read_exact(&mut n4)?;
        let mut h = vec![0u8; u32::from_le_bytes(n4) as usize];
        self.from.read_exact(&mut h)?;
        let header: Value = serde_json::from_slice(&h).map_err(std::io::Error::other)?;
        self.from.read_exact(&mut n4)?;
        let count = u32::from_le_bytes(n4) as usize;
        let mut blobs = Vec::with_capacity(count.min(1024));
        for _ in 0..count {
            let mut n8 = [0u8; 8];
            self.from.read_exact(&mut n8)?;
            let len = usize::try_from(u64::from_le_bytes(n8)).map_err(std::io::Error::other)?;
            let mut b = Vec::new();
            b.try_reserve_exact(len).map_err(std::io::Error::other)?;
            b.resize(len, 0);
            self.from.read_exact(&mut b)?;
            blobs.push(b);
        }
        Ok((header, blobs))
    }

    fn call(&mut self, header: Value, blobs: &[&[u8]]) -> Result<Vec<Vec<u8>>> {
        let op = header["op"].as_str().unwrap_or("?").to_string();
        if self.send(&header, blobs).is_err() {
            return Err(self.died(&format!("receiving `{op}`")));
        }
        let (answer, blobs) = match self.receive() {
            Ok(x) => x,
            Err(_) => return Err(self.died(&format!("answering `{op}`"))),
        };
        if answer["ok"].as_bool() == Some(true) {
            return Ok(blobs);
        }
        Err(Error::Backend(format!("XLA:CPU `{op}`: {}", answer["error"].as_str().unwrap_or("no message"))))
    }
}

impl Executor for XlaCpuExecutor {
    fn ranks(&self) -> usize {
        self.ranks
    }

    fn put(&mut self, rank: usize, spec: &TensorSpec, data: Option<&[u8]>) -> Result<()> {
        if data.is_some_and(|d| d.len() != spec.byte_len()) {
            return Err(Error::Internal(format!("{}: {} bytes for a {:?} tensor", spec.name, data.map_or(0, |d| d.len()), spec.shape)));
        }
        let header = json!({"op": "put", "rank": rank, "name": spec.name, "shape": spec.shape, "dtype": spec.dtype, "zero": data.is_none()});
        self.call(header, data.as_slice()).map(|_| ())
    }

    fn load(&mut self, _manifest: &Manifest, dir: &std::path::Path) -> Result<()> {
        self.call(json!({"op": "load", "dir": dir.to_string_lossy()}), &[]).map(|_| ())
    }

    fn run(&mut self, graph: &str, inputs: &[Vec<Vec<u8>>]) -> Result<Vec<Vec<Vec<u8>>>> {
        if inputs.len() != self.ranks {
            return Err(Error::Internal(format!("{} ranks' inputs for {} ranks", inputs.len(), self.ranks)));
        }
        let per_rank = inputs.first().map_or(0, |i| i.len());
        let blobs: Vec<&[u8]> = inputs.iter().flat_map(|r| r.iter().map(|b| b.as_slice())).collect();
        let out = self.call(json!({"op": "run", "graph": graph, "inputs_per_rank": per_rank}), &blobs)?;
        if out.len() % self.ranks != 0 {
            return Err(Error::Backend(format!("XLA:CPU returned {} outputs for {} ranks", out.len(), self.ranks)));
        }
        let each = out.len() / self.ranks;
        let mut it = out.into_iter();
        Ok((0..self.ranks).map(|_| it.by_ref().take(each).collect()).collect())
    }

    fn fetch(&mut self, rank: usize, name: &str) -> Result<Vec<u8>> {
        self.fetch_bytes(rank, name)
    }
}

impl XlaCpuExecutor {
    fn fetch_bytes(&mut self, rank: usize, name: &str) -> Result<Vec<u8>> {
        let mut out = self.call(json!({"op": "fetch", "rank": rank, "name": name}), &[])?;
        out.pop().ok_or_else(|| Error::Backend(format!("XLA:CPU returned nothing for {name}")))
    }
}

impl Drop for XlaCpuExecutor {
    fn drop(&mut self) {
        let _ = self.send(&json!({"op": "exit"}), &[]);
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
