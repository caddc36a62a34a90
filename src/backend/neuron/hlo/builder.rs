//! A shape-checked builder of HLO modules: what a recording backend emits as it records a forward.
//! Every op checks its operands' shapes (a graph XLA or neuronx-cc would reject fails here, with
//! the op named), ids are unique in the module, callees come before their callers, layouts are
//! row-major, and parameters are parameters (weights and caches are never constants).

use super::proto::*;
use crate::error::{Error, Result};

/// An element type and dimensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape {
    pub ty: PrimitiveType,
    pub dims: Vec<i64>,
}

impl Shape {
    pub fn new(ty: PrimitiveType, dims: &[i64]) -> Shape {
        Shape { ty, dims: dims.to_vec() }
    }

    fn proto(&self) -> ShapeProto {
        let rank = self.dims.len() as i64;
        ShapeProto {
            element_type: self.ty as i32,
            dimensions: self.dims.clone(),
            layout: Some(LayoutProto { minor_to_major: (0..rank).rev().collect() }),
            is_dynamic_dimension: vec![false; self.dims.len()],
            ..Default::default()
        }
    }
}

/// A value in the computation being built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Node(usize);

struct Computation {
    name: String,
    id: i64,
    instrs: Vec<HloInstructionProto>,
    shapes: Vec<Shape>,
    params: Vec<(Shape, String)>,
}

/// Builds one module: an entry computation plus the small computations its reduces call.
pub struct ModuleBuilder {
    name: String,
    next_id: i64,
    /// Finished callees, in the order they were made (before the entry in the module).
    callees: Vec<HloComputationProto>,
    entry: Computation,
    /// Output tuple index -> entry parameter number (MUST_ALIAS).
    aliases: Vec<(i64, i64)>,
}

fn shape_err(op: &str, detail: String) -> Error {
    Error::Internal(format!("HLO `{op}`: {detail}"))
}

impl ModuleBuilder {
    pub fn new(name: &str) -> ModuleBuilder {
        let entry = Computation { name: format!("{name}.entry"), id: 0, instrs: vec![], shapes: vec![], params: vec![] };
        let mut b = ModuleBuilder { name: name.to_string(), next_id: 1, callees: vec![], entry, aliases: vec![] };
        b.entry.id = b.fresh_id();
        b
    }

    fn fresh_id(&mut self) -> i64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    pub fn shape(&self, n: Node) -> &Shape {
        &self.entry.shapes[n.0]
    }

    fn push(&mut self, opcode: &str, shape: Shape, operands: &[Node], fill: impl FnOnce(&mut HloInstructionProto)) -> Node {
        let id = self.fresh_id();
        let mut ins = HloInstructionProto {
            name: format!("{}.{id}", opcode.replace('-', "_")),
            opcode: opcode.to_string(),
            shape: Some(shape.proto()),
            id,
            operand_ids: operands.iter().map(|o| self.entry.instrs[o.0].id).collect(),
            ..Default::default()
        };
        fill(&mut ins);
        self.entry.instrs.push(ins);
        self.entry.shapes.push(shape);
        Node(self.entry.instrs.len() - 1)
    }

    /// The next entry parameter; `name` becomes its NEFF input name.
    pub fn parameter(&mut self, shape: Shape, name: &str) -> Node {
        let number = self.entry.params.len() as i64;
        self.entry.params.push((shape.clone(), name.to_string()));
        let name = name.to_string();
        self.push("parameter", shape, &[], |ins| {
            ins.parameter_number = number;
            let mut map = std::collections::BTreeMap::new();
            map.insert("neff_input_names".to_string(), name);
            ins.frontend_attributes = Some(FrontendAttributes { map });
        })
    }

    pub fn constant_f32(&mut self, value: f32) -> Node {
        let shape = Shape::new(PrimitiveType::F32, &[]);
        let literal = LiteralProto { shape: Some(shape.proto()), f32s: vec![value], ..Default::default() };
        self.push("constant", shape, &[], |ins| ins.literal = Some(literal))
    }

    /// An elementwise op of two operands of one shape ("add", "multiply", "subtract", ...).
    pub fn binary(&mut self, opcode: &str, a: Node, b: Node) -> Result<Node> {
        let (sa, sb) = (self.shape(a).clone(), self.shape(b).clone());
        if sa != sb {
            return Err(shape_err(opcode, format!("operands {sa:?} and {sb:?} differ")));
        }
        Ok(self.push(opcode, sa, &[a, b], |_| {}))
    }

    /// `x` broadcast into `dims`, its dimensions mapping to `map` of the result.
    pub fn broadcast(&mut self, x: Node, dims: &[i64], map: &[i64]) -> Result<Node> {
        let s = self.shape(x).clone();
        let ok = map.len() == s.dims.len()
            && map.iter().zip(&s.dims).all(|(&m, &d)| (m as usize) < dims.len() && dims[m as usize] == d);
        if !ok {
            return Err(shape_err("broadcast", format!("{:?} cannot map onto {dims:?} by {map:?}", s.dims)));
        }
        Ok(self.push("broadcast", Shape::new(s.ty, dims), &[x], |ins| ins.dimensions = map.to_vec()))
    }

    pub fn reshape(&mut self, x: Node, dims: &[i64]) -> Result<Node> {
        let s = self.shape(x).clone();
        if s.dims.iter().product::<i64>() != dims.iter().product::<i64>() {
            return Err(shape_err("reshape", format!("{:?} has another element count than {dims:?}", s.dims)));
        }
        Ok(self.push("reshape", Shape::new(s.ty, dims), &[x], |_| {}))
    }

    /// A matrix product contracting `lhs_c` of `a` with `rhs_c` of `b` (no batch dimensions):
    /// result dims = a's free dims then b's free dims.
    pub fn dot(&mut self, a: Node, b: Node, lhs_c: i64, rhs_c: i64) -> Result<Node> {
        let (sa, sb) = (self.shape(a).clone(), self.shape(b).clone());
        let (ka, kb) = (sa.dims.get(lhs_c as usize), sb.dims.get(rhs_c as usize));
        if sa.ty != sb.ty || ka.is_none() || ka != kb {
            return Err(shape_err("dot", format!("{sa:?} . {sb:?} over dims {lhs_c} / {rhs_c}")));
        }
        let free = |s: &Shape, c: i64| s.dims.iter().enumerate().filter(|(i, _)| *i as i64 != c).map(|(_, &d)| d).collect::<Vec<_>>();
        let mut dims = free(&sa, lhs_c);
        dims.extend(free(&sb, rhs_c));
        let numbers = DotDimensionNumbers {
            lhs_contracting_dimensions: vec![lhs_c],
            rhs_contracting_dimensions: vec![rhs_c],
            ..Default::default()
        };
        Ok(self.push("dot", Shape::new(sa.ty, &dims), &[a, b], |ins| ins.dot_dimension_numbers = Some(numbers)))
    }

    /// An elementwise op of one operand ("rsqrt", "exponential", "logistic", "negate", ...).
    pub fn unary(&mut self, opcode: &str, x: Node) -> Node {
        let s = self.shape(x).clone();
        self.push(opcode, s, &[x], |_| {})
    }

    pub fn constant_s32(&mut self, value: i32) -> Node {
        let shape = Shape::new(PrimitiveType::S32, &[]);
        let literal = LiteralProto { shape: Some(shape.proto()), s32s: vec![value], ..Default::default() };
        self.push("constant", shape, &[], |ins| ins.literal = Some(literal))
    }

    /// A scalar f32 constant broadcast to `dims`.
    pub fn full(&mut self, value: f32, dims: &[i64]) -> Result<Node> {
        let c = self.constant_f32(value);
        self.broadcast(c, dims, &[])
    }

    /// 0, 1, 2, ... along `dim` of an s32 array of `dims`.
    pub fn iota(&mut self, dims: &[i64], dim: i64) -> Node {
        self.push("iota", Shape::new(PrimitiveType::S32, dims), &[], |ins| ins.dimensions = vec![dim])
    }

    /// Elementwise comparison ("EQ", "LE", ...) giving a PRED array.
    pub fn compare(&mut self, a: Node, b: Node, direction: &str) -> Result<Node> {
        let (sa, sb) = (self.shape(a).clone(), self.shape(b).clone());
        if sa != sb {
            return Err(shape_err("compare", format!("operands {sa:?} and {sb:?} differ")));
        }
        let dir = direction.to_string();
        Ok(self.push("compare", Shape::new(PrimitiveType::Pred, &sa.dims), &[a, b], |ins| ins.comparison_direction = dir))
    }

    pub fn convert(&mut self, x: Node, ty: PrimitiveType) -> Node {
        let dims = self.shape(x).dims.clone();
        self.push("convert", Shape::new(ty, &dims), &[x], |_| {})
    }

    /// Sum ("add") or max ("maximum") of an f32 array over `dims`.
    pub fn reduce(&mut self, x: Node, dims: &[i64], op: &str) -> Result<Node> {
        let s = self.shape(x).clone();
        if s.ty != PrimitiveType::F32 || dims.iter().any(|&d| d < 0 || d as usize >= s.dims.len()) {
            return Err(shape_err("reduce", format!("{s:?} over {dims:?}")));
        }
        let init = if op == "maximum" { f32::NEG_INFINITY } else { 0.0 };
        let init = self.constant_f32(init);
        let callee = self.scalar_computation(s.ty, op);
        let out: Vec<i64> = s.dims.iter().enumerate().filter(|(i, _)| !dims.contains(&(*i as i64))).map(|(_, &d)| d).collect();
        let dims = dims.to_vec();
        Ok(self.push("reduce", Shape::new(s.ty, &out), &[x, init], |ins| {
            ins.dimensions = dims;
            ins.called_computation_ids = vec![callee];
        }))
    }

    /// `x[start..limit]` along every dimension (stride 1).
    pub fn slice(&mut self, x: Node, start: &[i64], limit: &[i64]) -> Result<Node> {
        let s = self.shape(x).clone();
        let ok = start.len() == s.dims.len()
            && limit.len() == s.dims.len()
            && start.iter().zip(limit).zip(&s.dims).all(|((&a, &b), &d)| 0 <= a && a <= b && b <= d);
        if !ok {
            return Err(shape_err("slice", format!("{start:?}..{limit:?} of {:?}", s.dims)));
        }
        let dims: Vec<i64> = start.iter().zip(limit).map(|(a, b)| b - a).collect();
        let sd = start.iter().zip(limit).map(|(&a, &b)| SliceDimensions { start: a, limit: b, stride: 1 }).collect();
        Ok(self.push("slice", Shape::new(s.ty, &dims), &[x], |ins| ins.slice_dimensions = sd))
    }

    pub fn concatenate(&mut self, parts: &[Node], dim: i64) -> Result<Node> {
        let first = self.shape(parts[0]).clone();
        let mut dims = first.dims.clone();
        dims[dim as usize] = 0;
        for &p in parts {
            let s = self.shape(p);
            let same = s.ty == first.ty
                && s.dims.len() == first.dims.len()
                && s.dims.iter().zip(&first.dims).enumerate().all(|(i, (a, b))| i as i64 == dim || a == b);
            if !same {
                return Err(shape_err("concatenate", format!("{s:?} with {first:?} along {dim}")));
            }
            dims[dim as usize] += s.dims[dim as usize];
        }
        Ok(self.push("concatenate", Shape::new(first.ty, &dims), parts, |ins| ins.dimensions = vec![dim]))
    }

    pub fn transpose(&mut self, x: Node, perm: &[i64]) -> Result<Node> {
        let s = self.shape(x).clone();
        let mut seen = perm.to_vec();
        seen.sort_unstable();
        if seen != (0..s.dims.len() as i64).collect::<Vec<_>>() {
            return Err(shape_err("transpose", format!("{perm:?} of {:?}", s.dims)));
        }
        let dims: Vec<i64> = perm.iter().map(|&p| s.dims[p as usize]).collect();
        Ok(self.push("transpose", Shape::new(s.ty, &dims), &[x], |ins| ins.dimensions = perm.to_vec()))
    }

    /// A batched matrix product: batch dims first (`lhs_b` with `rhs_b`), then `a`'s free dims,
    /// then `b`'s, contracting `lhs_c` with `rhs_c`.
    pub fn dot_general(&mut self, a: Node, b: Node, lhs_b: &[i64], rhs_b: &[i64], lhs_c: i64, rhs_c: i64) -> Result<Node> {
        let (sa, sb) = (self.shape(a).clone(), self.shape(b).clone());
        let dim = |s: &Shape, i: i64| s.dims.get(i as usize).copied();
        let batch_ok = lhs_b.len() == rhs_b.len() && lhs_b.iter().zip(rhs_b).all(|(&l, &r)| dim(&sa, l).is_some() && dim(&sa, l) == dim(&sb, r));
        if sa.ty != sb.ty || !batch_ok || dim(&sa, lhs_c).is_none() || dim(&sa, lhs_c) != dim(&sb, rhs_c) {
            return Err(shape_err("dot", format!("{sa:?} . {sb:?} batch {lhs_b:?}/{rhs_b:?} over {lhs_c}/{rhs_c}")));
        }
        let free = |s: &Shape, bd: &[i64], c: i64| {
            s.dims.iter().enumerate().filter(|(i, _)| *i as i64 != c && !bd.contains(&(*i as i64))).map(|(_, &d)| d).collect::<Vec<_>>()
        };
        let mut dims: Vec<i64> = lhs_b.iter().map(|&l| sa.dims[l as usize]).collect();
        dims.extend(free(&sa, lhs_b, lhs_c));
        dims.extend(free(&sb, rhs_b, rhs_c));
        let numbers = DotDimensionNumbers {
            lhs_contracting_dimensions: vec![lhs_c],
            rhs_contracting_dimensions: vec![rhs_c],
            lhs_batch_dimensions: lhs_b.to_vec(),
            rhs_batch_dimensions: rhs_b.to_vec(),
        };
        Ok(self.push("dot", Shape::new(sa.ty, &dims), &[a, b], |ins| ins.dot_dimension_numbers = Some(numbers)))
    }

    /// The scalar computation (x op y) a reduction calls.
    fn scalar_computation(&mut self, ty: PrimitiveType, op: &str) -> i64 {
        let scalar = Shape::new(ty, &[]);
        let id = self.fresh_id();
        let (p0, p1, add) = (self.fresh_id(), self.fresh_id(), self.fresh_id());
        let param = |n: i64, pid: i64| HloInstructionProto {
            name: format!("x.{pid}"),
            opcode: "parameter".into(),
            shape: Some(scalar.proto()),
            parameter_number: n,
            id: pid,
            ..Default::default()
        };
        let sum = HloInstructionProto {
            name: format!("{op}.{add}"),
            opcode: op.into(),
            shape: Some(scalar.proto()),
            id: add,
            operand_ids: vec![p0, p1],
            ..Default::default()
        };
        self.callees.push(HloComputationProto {
            name: format!("{}.{id}", if op == "add" { "sum" } else { op }),
            instructions: vec![param(0, p0), param(1, p1), sum],
            program_shape: Some(ProgramShapeProto {
                parameters: vec![scalar.proto(), scalar.proto()],
                result: Some(scalar.proto()),
                parameter_names: vec!["x".into(), "y".into()],
            }),
            id,
            root_id: add,
        });
        id
    }

    /// The sum of `x` over each replica group (rank order within a group), on every member.
    pub fn all_reduce_sum(&mut self, x: Node, groups: &[Vec<i64>]) -> Result<Node> {
        let s = self.shape(x).clone();
        if !matches!(s.ty, PrimitiveType::F32 | PrimitiveType::Bf16 | PrimitiveType::F16) {
            return Err(shape_err("all-reduce", format!("{:?} values (collectives take floats only)", s.ty)));
        }
        let sum = self.scalar_computation(s.ty, "add");
        let groups = groups.iter().map(|g| ReplicaGroup { replica_ids: g.clone() }).collect();
        Ok(self.push("all-reduce", s, &[x], |ins| {
            ins.called_computation_ids = vec![sum];
            ins.replica_groups = groups;
        }))
    }

    /// `operand` with `update` written at `starts` (one scalar s32 index per dimension).
    pub fn dynamic_update_slice(&mut self, operand: Node, update: Node, starts: &[Node]) -> Result<Node> {
        let (so, su) = (self.shape(operand).clone(), self.shape(update).clone());
        let idx_ok = starts.iter().all(|&n| *self.shape(n) == Shape::new(PrimitiveType::S32, &[]));
        let fits = so.ty == su.ty && so.dims.len() == su.dims.len() && su.dims.iter().zip(&so.dims).all(|(u, o)| u <= o);
        if !fits || !idx_ok || starts.len() != so.dims.len() {
            return Err(shape_err("dynamic-update-slice", format!("{su:?} into {so:?} at {} indices", starts.len())));
        }
        let mut operands = vec![operand, update];
        operands.extend_from_slice(starts);
        Ok(self.push("dynamic-update-slice", so, &operands, |_| {}))
    }

    /// Rows `idx` ([t] s32, each in range) of `table` ([rows, width]) -> [t, width]: the
    /// embedding lookup and the rotary tables at the step's positions.
    pub fn gather_rows(&mut self, table: Node, idx: Node) -> Result<Node> {
        let (st, si) = (self.shape(table).clone(), self.shape(idx).clone());
        if st.dims.len() != 2 || si.ty != PrimitiveType::S32 || si.dims.len() != 1 {
            return Err(shape_err("gather", format!("rows {si:?} of {st:?}")));
        }
        let numbers = GatherDimensionNumbers {
            offset_dims: vec![1],
            collapsed_slice_dims: vec![0],
            start_index_map: vec![0],
            index_vector_dim: 1,
        };
        let width = st.dims[1];
        Ok(self.push("gather", Shape::new(st.ty, &[si.dims[0], width]), &[table, idx], |ins| {
            ins.gather_dimension_numbers = Some(numbers);
            ins.gather_slice_sizes = vec![1, width];
        }))
    }

    /// The `sizes` block of `x` at `starts` (one scalar s32 index per dimension).
    pub fn dynamic_slice(&mut self, x: Node, starts: &[Node], sizes: &[i64]) -> Result<Node> {
        let s = self.shape(x).clone();
        let idx_ok = starts.iter().all(|&n| *self.shape(n) == Shape::new(PrimitiveType::S32, &[]));
        let fits = sizes.len() == s.dims.len() && sizes.iter().zip(&s.dims).all(|(&z, &d)| z >= 0 && z <= d);
        if !fits || !idx_ok || starts.len() != s.dims.len() {
            return Err(shape_err("dynamic-slice", format!("{sizes:?} of {s:?} at {} indices", starts.len())));
        }
        let mut operands = vec![x];
        operands.extend_from_slice(starts);
        Ok(self.push("dynamic-slice", Shape::new(s.ty, sizes), &operands, |ins| ins.dynamic_slice_sizes = sizes.to_vec()))
    }

    /// Elementwise `pred ? a : b`.
    pub fn select(&mut self, pred: Node, a: Node, b: Node) -> Result<Node> {
        let (sp, sa, sb) = (self.shape(pred).clone(), self.shape(a).clone(), self.shape(b).clone());
        if sp.ty != PrimitiveType::Pred || sa != sb || sp.dims != sa.dims {
            return Err(shape_err("select", format!("{sp:?} ? {sa:?} : {sb:?}")));
        }
        Ok(self.push("select", sa, &[pred, a, b], |_| {}))
    }

    /// The root: a tuple of `outputs`; `aliases` are (output index, parameter number) pairs whose
    /// buffers must be the same (the KV caches updated in place).
    pub fn finish(self, outputs: &[Node], aliases: &[(usize, usize)]) -> Result<HloModuleProto> {
        self.finish_named(outputs, &[], aliases)
    }

    /// `finish` with the NEFF output names (`neff_output_names` on the root) when not empty.
    pub fn finish_named(mut self, outputs: &[Node], names: &[String], aliases: &[(usize, usize)]) -> Result<HloModuleProto> {
        if !names.is_empty() && names.len() != outputs.len() {
            return Err(shape_err("tuple", format!("{} names for {} outputs", names.len(), outputs.len())));
        }
        for &(out, param) in aliases {
            let (o, p) = (outputs.get(out), self.entry.params.get(param));
            match (o, p) {
                (Some(&o), Some((ps, _))) if self.shape(o) == ps => {}
                _ => return Err(shape_err("tuple", format!("output {out} cannot alias parameter {param}"))),
            }
            self.aliases.push((out as i64, param as i64));
        }
        let shapes: Vec<ShapeProto> = outputs.iter().map(|&o| self.shape(o).proto()).collect();
        let tuple_shape = ShapeProto { element_type: PrimitiveType::Tuple as i32, tuple_shapes: shapes, ..Default::default() };
        let root_id = self.fresh_id();
        let root = HloInstructionProto {
            name: format!("tuple.{root_id}"),
            opcode: "tuple".into(),
            shape: Some(tuple_shape.clone()),
            id: root_id,
            operand_ids: outputs.iter().map(|o| self.entry.instrs[o.0].id).collect(),
            frontend_attributes: (!names.is_empty()).then(|| FrontendAttributes {
                map: [("neff_output_names".to_string(), names.join(","))].into_iter().collect(),
            }),
            ..Default::default()
        };
        self.entry.instrs.push(root);
        let program_shape = ProgramShapeProto {
            parameters: self.entry.params.iter().map(|(s, _)| s.proto()).collect(),
            result: Some(tuple_shape),
            parameter_names: self.entry.params.iter().map(|(_, n)| n.clone()).collect(),
        };
        let entry = HloComputationProto {
            name: self.entry.name.clone(),
            instructions: std::mem::take(&mut self.entry.instrs),
            program_shape: Some(program_shape.clone()),
            id: self.entry.id,
            root_id,
        };
        let mut computations = std::mem::take(&mut self.callees);
        computations.push(entry);
        let entries = self
            .aliases
            .iter()
            .map(|&(out, param)| AliasEntryProto { output_shape_index: vec![out], parameter_number: param, kind: MUST_ALIAS, ..Default::default() })
            .collect();
        Ok(HloModuleProto {
            name: self.name.clone(),
            entry_computation_name: self.entry.name.clone(),
            computations,
            host_program_shape: Some(program_shape),
            id: 1,
            entry_computation_id: self.entry.id,
            input_output_alias: Some(HloInputOutputAliasProto { entries }),
        })
    }
}

/// A self-check graph for the XLA:CPU harness: per rank `y = x @ w^T` (a row-parallel shard),
/// all-reduced over ranks {0, 1}, then written into an aliased cache at row `pos`. Returns the
/// serialized module. Shapes: x [n, k], w [m, k], cache [rows, m], pos s32 scalar.
pub fn selfcheck_graph(n: i64, k: i64, m: i64, rows: i64) -> Result<Vec<u8>> {
    use prost::Message;
    let sizes_ok = [n, k, m, rows].iter().all(|&v| (1..=1 << 20).contains(&v)) && n <= rows;
    if !sizes_ok {
        return Err(Error::invalid(format!(
            "selfcheck graph sizes n={n}, k={k}, m={m}, rows={rows}: each must be in 1..=2^20, with n <= rows"
        )));
    }
    let f32s = |d: &[i64]| Shape::new(PrimitiveType::F32, d);
    let mut b = ModuleBuilder::new("kvgen_selfcheck");
    let x = b.parameter(f32s(&[n, k]), "x");
    let w = b.parameter(f32s(&[m, k]), "w");
    let cache = b.parameter(f32s(&[rows, m]), "cache");
    let pos = b.parameter(Shape::new(PrimitiveType::S32, &[]), "pos");
    let y = b.dot(x, w, 1, 1)?;
    let y = b.all_reduce_sum(y, &[vec![0, 1]])?;
    let zero = b.push("constant", Shape::new(PrimitiveType::S32, &[]), &[], |ins| {
        ins.literal = Some(LiteralProto { shape: Some(Shape::new(PrimitiveType::S32, &[]).proto()), s32s: vec![0], ..Default::default() })
    });
    let cache = b.dynamic_update_slice(cache, y, &[pos, zero])?;
    let module = b.finish(&[y, cache], &[(1, 2)])?;
    Ok(module.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn replica_groups_are_written_in_field_49() {
        let ins = HloInstructionProto { replica_groups: vec![ReplicaGroup { replica_ids: vec![0, 1] }], ..Default::default() };
        // Tag of field 49, wire type 2 (length-delimited): (49 << 3) | 2 = 394 = varint 0x8a 0x03;
        // then the group's length (4) and its packed replica_ids field 1 (0x0a, 2 bytes: 0, 1).
        assert_eq!(ins.encode_to_vec(), vec![0x8a, 0x03, 0x04, 0x0a, 0x02, 0x00, 0x01]);
    }

    #[test]
    fn the_selfcheck_module_is_pinned_and_well_formed() {
        let bytes = selfcheck_graph(2, 4, 3, 8).unwrap();
        let m = HloModuleProto::decode(bytes.as_slice()).unwrap();
        // Callee (the reducer) first, then the entry; ids unique across the module.
        assert_eq!(m.computations.len(), 2);
        assert_eq!(m.computations[1].id, m.entry_computation_id);
        let mut ids: Vec<i64> = m.computations.iter().flat_map(|c| c.instructions.iter().map(|i| i.id)).collect();
        ids.extend(m.computations.iter().map(|c| c.id));
        let n = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), n);
        let entry = &m.computations[1];
        let ar = entry.instructions.iter().find(|i| i.opcode == "all-reduce").unwrap();
        assert_eq!(ar.replica_groups[0].replica_ids, vec![0, 1]);
        assert_eq!(ar.called_computation_ids, vec![m.computations[0].id]);
        let alias = &m.input_output_alias.as_ref().unwrap().entries[0];
        assert_eq!((alias.output_shape_index.clone(), alias.parameter_number, alias.kind), (vec![1], 2, MUST_ALIAS));
        // Pinned: any change to a field number, id scheme or layout changes these bytes.
        let digest = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        assert_eq!((bytes.len(), digest), PINNED_SELFCHECK, "re-pin only after checking the new bytes with XLA");
    }

    #[test]
    fn ops_refuse_shapes_xla_would_reject() {
        let mut b = ModuleBuilder::new("bad");
        let f = |d: &[i64]| Shape::new(PrimitiveType::F32, d);
        let x = b.parameter(f(&[2, 4]), "x");
        let w = b.parameter(f(&[3, 5]), "w");
        let i = b.parameter(Shape::new(PrimitiveType::S32, &[2]), "i");
        assert!(b.dot(x, w, 1, 1).is_err());
        assert!(b.binary("add", x, w).is_err());
        assert!(b.reshape(x, &[3, 3]).is_err());
        assert!(b.all_reduce_sum(i, &[vec![0, 1]]).is_err());
        assert!(b.finish(&[x], &[(0, 1)]).is_err());
    }

    // Checked with XLA: tests/test_neuron_hlo.py runs these bytes on XLA:CPU (2 replicas).
    const PINNED_SELFCHECK: (usize, u64) = (1044, 14005877023386679023);
}
