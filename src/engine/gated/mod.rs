//! The gated inference network. Gate decisions are made on the host, per input, from one
//! small MLP over the stem's pooled features; then every block runs only on the inputs
//! that execute it, grouped by chosen width: a block whose inputs decided differently puts
//! its rows in order of their decisions (one copy of the batch, only when the order
//! changes), so each group reads its own run of rows and adds its residual into the same
//! rows of the shortcut in place; the network follows which input each row holds and
//! returns results in input order. Inputs that pass an exit leave the batch. Nothing is
//! computed densely and masked; rows that chose different `select` sets may run together on
//! the union of their sets, each masked to its own, and are then counted at the union's
//! width.

mod block;
pub mod plan;

use tch::{Device, Kind, Tensor};

use self::block::GatedBlock;
use self::plan::{Exec, Thresholds, decide, exec_widths, select_limit};
use super::arch::ArchSpec;
use super::flops::{conv_flops, linear_flops, residual_flops, shortcut_flops, stem_flops};
use super::folded::{FoldedConv, FoldedLinear, Format, ROW_TILE_BYTES, row_tiles, stem_forward};
use super::gates::{GateLayout, GateParams};
use super::onednn::Post;
use super::params::ResNetParams;
use super::policy::{ChannelMode, GatePolicy, passes};
use super::report::{BlockDecision, ComputeReport};

/// The gate MLP, with every gate's output layer fused into one matrix.
#[derive(Debug)]
struct FoldedTrunk {
    fc1: FoldedLinear,
    fc2: FoldedLinear,
}

impl FoldedTrunk {
    /// Sigmoid scores `[n × outputs]`, row-major on the host.
    fn scores(&self, stem_out: &Tensor, format: Format) -> Vec<f32> {
        let hidden = self.fc1.forward(&format.pool(stem_out)).relu_();
        let scores = self.fc2.forward(&hidden).sigmoid_();
        Vec::<f32>::try_from(scores.view(-1)).unwrap_or_default()
    }

    fn flops(&self) -> u64 {
        let (h, c) = self.fc1.weight.size2().unwrap_or((0, 0));
        let (o, _) = self.fc2.weight.size2().unwrap_or((0, 0));
        linear_flops(c, h) + linear_flops(h, o)
    }
}

/// An exit head: optional 3x3/s2 conv with ReLU, global pool, linear.
#[derive(Debug)]
struct FoldedExit {
    stage: usize,
    /// Index of the block after which it sits.
    after_block: usize,
    conv: Option<FoldedConv>,
    fc: FoldedLinear,
}

impl FoldedExit {
    fn forward(&self, x: &Tensor, format: Format) -> Tensor {
        let x = match &self.conv {
            Some(conv) => conv.forward_relu(x),
            None => x.shallow_clone(),
        };
        self.fc.forward(&format.pool(&x))
    }

    fn flops(&self, h: i64, w: i64) -> u64 {
        let conv = self.conv.as_ref().map_or(0, |c| {
            conv_flops(c.shape.in_ch, c.shape.out_ch, 3, c.shape.out_hw(h), c.shape.out_hw(w))
        });
        let (classes, inputs) = self.fc.weight.size2().unwrap_or((0, 0));
        conv + linear_flops(inputs, classes)
    }
}

/// What [`GatedResNet::trace`] records.
#[derive(Debug)]
pub struct ExitTrace {
    /// Per exit (layout order): `[N, classes]` logits.
    pub exit_logits: Vec<Tensor>,
    /// Per exit, per input: executed FLOPs had the input left there (heads so far included).
    pub flops_at_exit: Vec<Vec<u64>>,
    /// Per input: FLOPs of all exit heads (what running with exits off saves).
    pub head_flops: Vec<u64>,
    pub final_logits: Tensor,
    /// Reports of the traced pass (exit heads included, no exit taken).
    pub reports: Vec<ComputeReport>,
}

/// A gated ResNet ready for inference.
#[derive(Debug)]
pub struct GatedResNet {
    pub spec: ArchSpec,
    pub format: Format,
    pub gates: GateLayout,
    stem: FoldedConv,
    trunk: Option<FoldedTrunk>,
    blocks: Vec<GatedBlock>,
    exits: Vec<FoldedExit>,
    fc: FoldedLinear,
    /// [`ROW_TILE_BYTES`] unless a test asks for other tiles.
    pub row_tile_bytes: i64,
}

impl GatedResNet {
    /// Folds batch-norm, pre-slices every allowed width and fuses the gate heads.
    pub fn build(backbone: &ResNetParams, gates: &GateParams, format: impl Into<Format>) -> Self {
        let format = format.into();
        let spec = backbone.spec.clone();
        let trunk = gates.trunk.as_ref().map(|fc1| {
            let (ws, bs): (Vec<Tensor>, Vec<Tensor>) = gates
                .blocks
                .iter()
                .flat_map(|b| b.channel.iter().chain(b.block.iter()))
                .map(|d| (d.weight.detach(), d.bias.detach()))
                .unzip();
            FoldedTrunk {
                fc1: FoldedLinear::new(&fc1.weight, &fc1.bias),
                fc2: FoldedLinear::new(&Tensor::cat(&ws, 0), &Tensor::cat(&bs, 0)),
            }
        });
        let input = format.input_hw(&spec);
        let block_hw = spec.block_input_sizes(input);
        let blocks = backbone
            .blocks
            .iter()
            .zip(&gates.blocks)
            .zip(&gates.layout.blocks)
            .zip(&block_hw)
            .map(|(((params, gate), slots), &hw)| GatedBlock::build(params, gate, slots, format, hw))
            .collect();
        let mut last_block_of_stage = Vec::new();
        let mut seen = 0;
        for &n in &spec.blocks {
            seen += n;
            last_block_of_stage.push(seen - 1);
        }
        let exits = gates
            .exits
            .iter()
            .map(|e| FoldedExit {
                stage: e.stage,
                after_block: last_block_of_stage[e.stage - 1],
                conv: e.conv.as_ref().map(|(w, b)| {
                    let (o, i) = (w.size()[0], w.size()[1]);
                    let shape =
                        super::arch::ConvShape { in_ch: i, out_ch: o, kernel: 3, stride: 2, padding: 1 };
                    let hw = block_hw[last_block_of_stage[e.stage - 1] + 1];
                    FoldedConv::new(&w.detach(), &b.detach(), shape, format, hw, Post::Relu)
                }),
                fc: FoldedLinear::new(&e.fc.weight, &e.fc.bias),
            })
            .collect();
        GatedResNet {
            spec,
            format,
            gates: gates.layout.clone(),
            stem: FoldedConv::fold(&backbone.stem, format, input, Post::Relu),
            trunk,
            blocks,
            exits,
            fc: FoldedLinear::copy_of(&backbone.fc),
            row_tile_bytes: ROW_TILE_BYTES,
        }
    }

    /// The gate MLP's sigmoid scores `[N, outputs]` for a batch (calibration, benchmarks).
    pub fn gate_scores(&self, input: &Tensor) -> Option<Tensor> {
        let trunk = self.trunk.as_ref()?;
        let stem = stem_forward(&self.stem, self.spec.stem, &self.format.apply(input));
        let n = input.size()[0];
        Some(Tensor::from_slice(&trunk.scores(&stem, self.format)).view([n, -1]))
    }

    /// Residual-branch convolutions block `index` has run so far (all widths and modes).
    pub fn residual_conv_calls(&self, index: usize) -> u64 {
        self.blocks[index].residual_calls()
    }

    /// Runs a `[N, C, H, W]` batch under `policy`: `[N, classes]` logits and one report per
    /// input.
    pub fn forward(&self, input: &Tensor, policy: &GatePolicy) -> (Tensor, Vec<ComputeReport>) {
        self.run(input, policy, None)
    }

    /// Runs a batch with every exit head evaluated and nobody leaving (the policy's exit
    /// thresholds are ignored), recording what each input would have cost and predicted at
    /// each exit: calibration derives every exit threshold from one pass.
    pub fn trace(&self, input: &Tensor, policy: &GatePolicy) -> ExitTrace {
        let n = input.size()[0] as usize;
        let mut trace = ExitTrace {
            exit_logits: Vec::new(),
            flops_at_exit: vec![vec![0; n]; self.exits.len()],
            head_flops: vec![0; n],
            final_logits: Tensor::zeros([0], tch::kind::FLOAT_CPU),
            reports: Vec::new(),
        };
        let (logits, reports) = self.run(input, policy, Some(&mut trace));
        trace.final_logits = logits;
        trace.reports = reports;
        trace
    }

    fn run(
        &self,
        input: &Tensor,
        policy: &GatePolicy,
        mut trace: Option<&mut ExitTrace>,
    ) -> (Tensor, Vec<ComputeReport>) {
        let size = input.size();
        let (n, h, w) = (size[0] as usize, size[2], size[3]);
        let thresholds = Thresholds::resolve(policy, &self.spec, &self.gates);
        let stem = stem_forward(&self.stem, self.spec.stem, &self.format.apply(input));
        let (sh, sw) = (stem.size()[2], stem.size()[3]);

        let mut hw = (sh, sw);
        let select_limits: Vec<f64> = self
            .blocks
            .iter()
            .map(|block| {
                let full = [block.spec.inner_width(); 2]; // one inner width per group
                let flops = residual_flops(&block.spec, hw.0, hw.1, &full[..block.spec.convs.len() - 1]);
                hw = block.spec.out_hw(hw);
                select_limit(hw.0 * hw.1, flops)
            })
            .collect();
        // The gate MLP runs only when a decision reads it: a gate at threshold 0 keeps
        // everything (so the dense policy costs exactly the dense network), and in select
        // mode blocks too small to select run in full whatever their scores.
        let reads_scores = self.blocks.iter().enumerate().zip(&select_limits).any(|((b, block), &limit)| {
            (block.slots.block.is_some() && thresholds.block[b] > 0.0)
                || (block.slots.channel.is_some()
                    && thresholds.channel[b] > 0.0
                    && (thresholds.mode == ChannelMode::Slice || limit > 0.0))
        });
        let trunk = self.trunk.as_ref().filter(|_| reads_scores);

        let stem_flops = stem_flops(&self.spec, h, w);
        let dense = stem_flops + self.body_dense_flops(sh, sw) + self.head_flops();
        let trunk_flops = trunk.map_or(0, FoldedTrunk::flops);
        let mut reports: Vec<ComputeReport> = (0..n)
            .map(|_| ComputeReport {
                dense_flops: dense,
                executed_flops: stem_flops + trunk_flops,
                gate_flops: trunk_flops,
                blocks: vec![BlockDecision::NotReached; self.blocks.len()],
                exit: None,
            })
            .collect();

        let scores = trunk.map(|t| t.scores(&stem, self.format)).unwrap_or_default();
        let stride = self.gates.outputs;
        let plans: Vec<Vec<Exec>> = (0..n)
            .map(|i| {
                let row = scores.get(i * stride..(i + 1) * stride).unwrap_or(&[]);
                self.blocks
                    .iter()
                    .enumerate()
                    .map(|(b, block)| {
                        decide(
                            &block.slots,
                            self.spec.block,
                            row,
                            thresholds.channel[b],
                            thresholds.block[b],
                            thresholds.mode,
                            select_limits[b],
                        )
                    })
                    .collect()
            })
            .collect();

        let mut active: Vec<usize> = (0..n).collect();
        let mut out: Option<Tensor> = None;
        let mut cur = stem;
        let (mut ch, mut cw) = (sh, sw);
        // Large batches run their leading blocks in tiles of rows (`row_tiles`), up to the
        // first exit's block: an exit sees the whole batch.
        let before_exits = self.exits.iter().map(|x| x.after_block + 1).min().unwrap_or(self.blocks.len());
        let shapes = self.blocks[..before_exits].iter().map(|b| (b.spec.out_ch(), b.spec.stride()));
        let elem = cur.kind().elt_size_in_bytes() as i64;
        let mut first = 0;
        if let Some(tiles) = row_tiles(shapes, n as i64, [sh, sw], elem, self.row_tile_bytes) {
            let (mut parts, mut order) = (Vec::new(), Vec::with_capacity(n));
            for (start, rows) in tiles.spans(n as i64) {
                let mut rows_active: Vec<usize> = (start as usize..(start + rows) as usize).collect();
                let mut t = cur.narrow(0, start, rows);
                (ch, cw) = (sh, sw);
                for b in 0..tiles.blocks {
                    t = self.run_block(b, &t, &mut rows_active, &plans, &mut reports, (ch, cw));
                    (ch, cw) = self.blocks[b].spec.out_hw((ch, cw));
                }
                parts.push(t);
                order.extend(rows_active);
            }
            cur = self.format.cat_rows(&parts);
            active = order;
            first = tiles.blocks;
        }
        for b in 0..self.blocks.len() {
            if b >= first {
                cur = self.run_block(b, &cur, &mut active, &plans, &mut reports, (ch, cw));
                (ch, cw) = self.blocks[b].spec.out_hw((ch, cw));
            }

            let Some((e, exit)) = self.exits.iter().enumerate().find(|(_, x)| x.after_block == b) else {
                continue;
            };
            let t = thresholds.exit[e];
            if t >= 1.0 && trace.is_none() {
                continue; // disabled: the head is not even evaluated
            }
            let exit_logits = exit.forward(&cur, self.format);
            if let Some(trace) = trace.as_deref_mut() {
                let head = exit.flops(ch, cw);
                for &i in &active {
                    reports[i].executed_flops += head;
                    reports[i].gate_flops += head;
                    trace.head_flops[i] += head;
                    trace.flops_at_exit[e][i] = reports[i].executed_flops;
                }
                trace.exit_logits.push(in_input_order(exit_logits, &active));
                continue;
            }
            let confidence = exit_logits.softmax(1, Kind::Float).amax(&[1i64][..], false);
            let confidence = Vec::<f32>::try_from(confidence).unwrap_or_default();
            let head = exit.flops(ch, cw);
            let (mut leave, mut stay) = (Vec::new(), Vec::new());
            for (local, &i) in active.iter().enumerate() {
                reports[i].executed_flops += head;
                reports[i].gate_flops += head;
                if passes(confidence[local], t) {
                    reports[i].exit = Some(exit.stage);
                    leave.push(local as i64);
                } else {
                    stay.push(local);
                }
            }
            if leave.is_empty() {
                continue;
            }
            let dst = out.get_or_insert_with(|| {
                Tensor::zeros([n as i64, self.spec.num_classes], tch::kind::FLOAT_CPU)
            });
            let leave_t = Tensor::from_slice(&leave);
            let rows: Vec<i64> = leave.iter().map(|&l| active[l as usize] as i64).collect();
            let _ = dst.index_copy_(0, &Tensor::from_slice(&rows), &exit_logits.index_select(0, &leave_t));
            if stay.is_empty() {
                return (out.unwrap_or_else(|| Tensor::zeros([0], tch::kind::FLOAT_CPU)), reports);
            }
            cur = self.format.rows(&cur, &stay);
            active = stay.iter().map(|&l| active[l]).collect();
        }
        let logits = self.fc.forward(&self.format.pool(&cur));
        let fc = self.head_flops();
        for &i in &active {
            reports[i].executed_flops += fc;
        }
        let logits = match out {
            None => in_input_order(logits, &active),
            Some(mut dst) => {
                let rows: Vec<i64> = active.iter().map(|&i| i as i64).collect();
                let _ = dst.index_copy_(0, &Tensor::from_slice(&rows), &logits);
                dst
            }
        };
        (logits, reports)
    }

    /// Runs block `b` on `x`, whose row `p` holds input `active[p]` (an input of `hw`):
    /// charges each input the FLOPs it ran and records its decision, and returns the output,
    /// `active` reordered to its rows.
    fn run_block(
        &self,
        b: usize,
        x: &Tensor,
        active: &mut Vec<usize>,
        plans: &[Vec<Exec>],
        reports: &mut [ComputeReport],
        (h, w): (i64, i64),
    ) -> Tensor {
        let block = &self.blocks[b];
        let execs: Vec<&Exec> = active.iter().map(|&i| &plans[i][b]).collect();
        let block::BlockRun { out, union_widths: union, order } = block.run(x, &execs, self.format);
        for (&i, exec) in active.iter().zip(&execs) {
            // Rows that chose `select` and ran together ran at the union's widths.
            let widths = match (exec, &union) {
                (Exec::Select { .. }, Some(widths)) => widths.clone(),
                _ => exec_widths(exec, &block.slots, self.spec.block),
            };
            let cost = if widths.is_empty() { 0 } else { residual_flops(&block.spec, h, w, &widths) };
            reports[i].executed_flops += cost + shortcut_flops(&block.spec, h, w);
            reports[i].blocks[b] =
                if widths.is_empty() { BlockDecision::Skipped } else { BlockDecision::Run { widths } };
        }
        if let Some(order) = order {
            *active = order.iter().map(|&local| active[local]).collect();
        }
        out
    }

    /// Dense FLOPs of the residual blocks for a stem output of `h × w` (from the blocks'
    /// own specs: no allocation per batch).
    fn body_dense_flops(&self, h: i64, w: i64) -> u64 {
        let (mut h, mut w) = (h, w);
        let mut total = 0;
        for block in &self.blocks {
            let full = [block.spec.inner_width(); 2];
            let widths = &full[..block.spec.convs.len() - 1];
            total += residual_flops(&block.spec, h, w, widths) + shortcut_flops(&block.spec, h, w);
            (h, w) = block.spec.out_hw((h, w));
        }
        total
    }

    fn head_flops(&self) -> u64 {
        linear_flops(self.spec.feature_width(), self.spec.num_classes)
    }

    /// The device all tensors live on.
    pub fn device(&self) -> Device {
        self.stem.device()
    }
}

/// `rows` (row `p` belongs to input `active[p]`, every input present) in input order.
fn in_input_order(rows: Tensor, active: &[usize]) -> Tensor {
    if active.iter().enumerate().all(|(p, &i)| p == i) {
        return rows;
    }
    let index: Vec<i64> = active.iter().map(|&i| i as i64).collect();
    rows.zeros_like().index_copy_(0, &Tensor::from_slice(&index), &rows)
}
