//! S-UCB: the paper's HOO-style tree search over the continuous (pruning ratio x rank index) space.
//!
//! The root cell is `[ratio_min, ratio_max] x [0, K)` where `K` is the number of allowed ranks
//! and a rank index `k` stands for `ranks[k]`. A cell splits in two along its longer side
//! (both sides measured as fractions of the full space): ratio cells split at the midpoint,
//! rank cells at an integer index, so every cell holds whole ranks and snapping a point to
//! the allowed rank set is exact. Node `(h, i)` stores its play count `T` and reward sum;
//!
//! ```text
//! U = mean + c * sqrt(2 ln n / T) + nu * rho^h      (T = 0: +inf)
//! B = min(U, max(B_left, B_right))                  (a child not yet in the tree: +inf)
//! ```
//!
//! Each choice descends from the root by the larger `B` (ties at random) until it steps onto a
//! child that is not in the tree yet, adds it, and plays a uniformly random point of its
//! cell. A reward updates every node on the path from the root to the deepest node whose cell
//! holds the played point.
//!
//! Memory and time per call are bounded: nodes at `max_depth` are not split, and once the tree
//! holds `max_nodes` nodes it stops growing; a child that was never created then counts with
//! its parent's `U` instead of `+inf`, and playing it draws a point in its cell without adding
//! a node (the reward updates the path down to the parent). Each choice costs `O(nodes)`.
//! Checkpoints store each node as `[count, reward_sum, left, right]` (`0`: no child); cells
//! and depths are rebuilt from the tree's shape on load.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::grid::argmax_random_tie;
use super::{check_range, check_reward, Policy};
use crate::arm::{Arm, ArmSpace, DeviceContext};
use crate::error::BanditError;
use crate::region::FeasibleRegion;

/// Parameters of [`SUcb`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SUcbConfig {
    /// Smoothness scale `nu` of the reward surface (>= 0). Default `1.0`.
    pub nu: f64,
    /// Per-level shrink factor `rho` of the cell-diameter term, in (0, 1). Default `0.5`.
    pub rho: f64,
    /// Multiplier `c` of the confidence term. Default `1.0` (the formula in DESIGN.md).
    pub exploration: f64,
    /// Depth below which cells are not split (the root is depth 0). Default `16`.
    pub max_depth: u32,
    /// Largest tree (one node per play until then). Default `2048`.
    pub max_nodes: usize,
}

impl Default for SUcbConfig {
    fn default() -> Self {
        SUcbConfig {
            nu: 1.0,
            rho: 0.5,
            exploration: 1.0,
            max_depth: 16,
            max_nodes: 2048,
        }
    }
}

/// A cell: ratios `[ratio_lo, ratio_hi)` (closed at `ratio_max`) and rank indices
/// `[rank_lo, rank_hi)`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Cell {
    ratio_lo: f64,
    ratio_hi: f64,
    rank_lo: u32,
    rank_hi: u32,
}

#[derive(Clone, Debug, PartialEq)]
struct Node {
    depth: u32,
    cell: Cell,
    count: u64,
    sum: f64,
    /// Indices of the two children in `nodes`, once they exist.
    children: [Option<u32>; 2],
}

/// S-UCB policy state: the tree, root first; children always come after their parent.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(try_from = "SUcbState")]
pub struct SUcb {
    config: SUcbConfig,
    space: ArmSpace,
    nodes: Vec<Node>,
}

/// The serialized form of [`SUcb`].
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SUcbState {
    config: SUcbConfig,
    space: ArmSpace,
    /// `[count, reward_sum, left, right]` per node; 0 means no child.
    nodes: Vec<(u64, f64, u32, u32)>,
}

#[derive(Serialize)]
struct SUcbStateRef<'a> {
    config: &'a SUcbConfig,
    space: &'a ArmSpace,
    nodes: Vec<(u64, f64, u32, u32)>,
}

impl Serialize for SUcb {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        SUcbStateRef {
            config: &self.config,
            space: &self.space,
            nodes: self
                .nodes
                .iter()
                .map(|n| {
                    let [l, r] = n.children.map(|c| c.unwrap_or(0));
                    (n.count, n.sum, l, r)
                })
                .collect(),
        }
        .serialize(serializer)
    }
}

impl TryFrom<SUcbState> for SUcb {
    type Error = BanditError;

    fn try_from(state: SUcbState) -> Result<Self, BanditError> {
        let bad = |why: String| BanditError::param("s-ucb tree", why, "a tree written by SUcb");
        let mut tree = SUcb::new(state.space, state.config)?;
        let n = state.nodes.len();
        if n == 0 {
            return Err(bad("no root".into()));
        }
        // Placeholders, each overwritten by its parent (which always comes first).
        let root = tree.nodes[0].clone();
        tree.nodes.resize(n, root);
        let mut has_parent = vec![false; n];
        for (i, &(count, sum, left, right)) in state.nodes.iter().enumerate() {
            if i > 0 && !has_parent[i] {
                return Err(bad(format!("node {i} is not reachable from the root")));
            }
            if !sum.is_finite() {
                return Err(bad(format!("node {i} has reward sum {sum}")));
            }
            tree.nodes[i].count = count;
            tree.nodes[i].sum = sum;
            tree.nodes[i].children = [None, None];
            for (side, child) in [left, right].into_iter().enumerate() {
                if child == 0 {
                    continue;
                }
                let j = child as usize;
                if j <= i || j >= n || has_parent[j] {
                    return Err(bad(format!("node {i} has an impossible child {j}")));
                }
                let Some(halves) = tree.split(&tree.nodes[i]) else {
                    return Err(bad(format!("node {i} cannot have children")));
                };
                has_parent[j] = true;
                tree.nodes[j].depth = tree.nodes[i].depth + 1;
                tree.nodes[j].cell = halves[side];
                tree.nodes[i].children[side] = Some(child);
            }
        }
        Ok(tree)
    }
}

impl SUcb {
    pub fn new(space: ArmSpace, config: SUcbConfig) -> Result<Self, BanditError> {
        space.validate()?;
        check_range("nu", config.nu, 0.0, f64::MAX, "a finite number >= 0")?;
        if !(config.rho > 0.0 && config.rho < 1.0) {
            return Err(BanditError::param("rho", config.rho, "a number in (0, 1)"));
        }
        check_range(
            "exploration",
            config.exploration,
            0.0,
            f64::MAX,
            "a finite number >= 0",
        )?;
        if config.max_depth > 60 {
            return Err(BanditError::param(
                "max_depth",
                config.max_depth,
                "at most 60",
            ));
        }
        if config.max_nodes == 0 || config.max_nodes > u32::MAX as usize {
            return Err(BanditError::param(
                "max_nodes",
                config.max_nodes,
                "between 1 and 2^32 - 1",
            ));
        }
        let root = Node {
            depth: 0,
            cell: Cell {
                ratio_lo: space.ratio_min,
                ratio_hi: space.ratio_max,
                rank_lo: 0,
                rank_hi: space.ranks.len() as u32,
            },
            count: 0,
            sum: 0.0,
            children: [None, None],
        };
        Ok(SUcb {
            config,
            space,
            nodes: vec![root],
        })
    }

    pub fn arm_space(&self) -> &ArmSpace {
        &self.space
    }

    pub fn config(&self) -> &SUcbConfig {
        &self.config
    }

    /// Number of nodes in the tree.
    pub fn tree_size(&self) -> usize {
        self.nodes.len()
    }

    /// Observations so far (the root's count).
    pub fn observations(&self) -> u64 {
        self.nodes[0].count
    }

    fn is_full(&self) -> bool {
        self.nodes.len() >= self.config.max_nodes
    }

    /// The two halves of a node's cell, or `None` if the node is a leaf for good (at
    /// `max_depth`, or nothing left to split).
    fn split(&self, node: &Node) -> Option<[Cell; 2]> {
        if node.depth >= self.config.max_depth {
            return None;
        }
        let c = node.cell;
        let full_ratio = self.space.ratio_max - self.space.ratio_min;
        let ratio_width = if full_ratio > 0.0 {
            (c.ratio_hi - c.ratio_lo) / full_ratio
        } else {
            0.0
        };
        let rank_width = (c.rank_hi - c.rank_lo) as f64 / self.space.ranks.len() as f64;
        let can_split_rank = c.rank_hi - c.rank_lo >= 2;
        let mid_ratio = c.ratio_lo + (c.ratio_hi - c.ratio_lo) / 2.0;
        let can_split_ratio = ratio_width > 0.0 && mid_ratio > c.ratio_lo && mid_ratio < c.ratio_hi;
        if can_split_rank && (rank_width >= ratio_width || !can_split_ratio) {
            let mid = c.rank_lo + (c.rank_hi - c.rank_lo) / 2;
            Some([Cell { rank_hi: mid, ..c }, Cell { rank_lo: mid, ..c }])
        } else if can_split_ratio {
            Some([
                Cell {
                    ratio_hi: mid_ratio,
                    ..c
                },
                Cell {
                    ratio_lo: mid_ratio,
                    ..c
                },
            ])
        } else {
            None
        }
    }

    fn cell_contains(&self, cell: &Cell, ratio: f64, rank_index: u32) -> bool {
        rank_index >= cell.rank_lo
            && rank_index < cell.rank_hi
            && ratio >= cell.ratio_lo
            && (ratio < cell.ratio_hi || cell.ratio_hi >= self.space.ratio_max)
    }

    /// Whether some arm of the cell lies in the region (the region is monotone, so it is
    /// enough to look at each rank's floor against the cell's upper ratio).
    fn cell_feasible(&self, cell: &Cell, region: &FeasibleRegion) -> bool {
        if region.is_unrestricted() {
            return true;
        }
        (cell.rank_lo..cell.rank_hi)
            .any(|k| region.allows_some(self.space.ranks[k as usize], cell.ratio_hi))
    }

    /// `U` and `B` of every node, bottom-up (children sit after their parents in `nodes`).
    fn bounds(&self) -> (Vec<f64>, Vec<f64>) {
        let n = self.nodes[0].count.max(1) as f64;
        let log_term = 2.0 * n.ln();
        let full = self.is_full();
        let mut u = vec![f64::INFINITY; self.nodes.len()];
        let mut b = vec![f64::INFINITY; self.nodes.len()];
        for (i, node) in self.nodes.iter().enumerate().rev() {
            if node.count > 0 {
                let t = node.count as f64;
                u[i] = node.sum / t
                    + self.config.exploration * (log_term / t).sqrt()
                    + self.config.nu * self.config.rho.powi(node.depth as i32);
            }
            b[i] = if self.split(node).is_none() {
                u[i]
            } else {
                let missing = if full { u[i] } else { f64::INFINITY };
                let child_b = |c: Option<u32>| c.map_or(missing, |j| b[j as usize]);
                u[i].min(child_b(node.children[0]).max(child_b(node.children[1])))
            };
        }
        (u, b)
    }

    /// A uniformly random feasible point of `cell`.
    fn sample_in(&self, cell: &Cell, region: &FeasibleRegion, rng: &mut ChaCha8Rng) -> Arm {
        let ranks: Vec<u32> = (cell.rank_lo..cell.rank_hi)
            .map(|k| self.space.ranks[k as usize])
            .filter(|&r| region.allows_some(r, cell.ratio_hi))
            .collect();
        let rank = ranks[rng.random_range(0..ranks.len())];
        let prune_ratio = region.sample_ratio(rank, cell.ratio_lo, cell.ratio_hi, rng);
        Arm { prune_ratio, rank }
    }
}

impl Policy for SUcb {
    fn choose_in(
        &mut self,
        ctx: &DeviceContext,
        region: &FeasibleRegion,
        rng: &mut ChaCha8Rng,
    ) -> Result<Arm, BanditError> {
        if !self.cell_feasible(&self.nodes[0].cell, region) {
            return Err(BanditError::NoFeasibleArm {
                device_id: ctx.device_id,
            });
        }
        let (u, b) = self.bounds();
        let full = self.is_full();
        let mut at = 0usize;
        loop {
            let node = &self.nodes[at];
            let Some(halves) = self.split(node) else {
                return Ok(self.sample_in(&node.cell, region, rng));
            };
            let missing = if full { u[at] } else { f64::INFINITY };
            let score = |side: usize| -> Option<f64> {
                if !self.cell_feasible(&halves[side], region) {
                    return None;
                }
                Some(node.children[side].map_or(missing, |j| b[j as usize]))
            };
            let side = match (score(0), score(1)) {
                (Some(l), Some(r)) if l == r => rng.random_range(0..2usize),
                (Some(l), Some(r)) => usize::from(r > l),
                (Some(_), None) => 0,
                (None, Some(_)) => 1,
                // A feasible cell always has a feasible half; kept as an error, not a panic.
                (None, None) => {
                    return Err(BanditError::NoFeasibleArm {
                        device_id: ctx.device_id,
                    })
                }
            };
            match node.children[side] {
                Some(j) => at = j as usize,
                None if full => return Ok(self.sample_in(&halves[side], region, rng)),
                None => {
                    let child = Node {
                        depth: node.depth + 1,
                        cell: halves[side],
                        count: 0,
                        sum: 0.0,
                        children: [None, None],
                    };
                    let j = self.nodes.len();
                    self.nodes[at].children[side] = Some(j as u32);
                    self.nodes.push(child);
                    return Ok(self.sample_in(&halves[side], region, rng));
                }
            }
        }
    }

    fn observe(&mut self, _ctx: &DeviceContext, arm: Arm, reward: f64) -> Result<(), BanditError> {
        self.space.check(&arm)?;
        check_reward(&arm, reward)?;
        let k = self.space.rank_index(arm.rank).expect("checked above") as u32;
        let mut at = 0usize;
        loop {
            self.nodes[at].count += 1;
            self.nodes[at].sum += reward;
            let next = self.nodes[at]
                .children
                .iter()
                .flatten()
                .copied()
                .find(|&j| self.cell_contains(&self.nodes[j as usize].cell, arm.prune_ratio, k));
            match next {
                Some(j) => at = j as usize,
                None => return Ok(()),
            }
        }
    }

    /// Descends from the root to the feasible child with the higher mean (children never
    /// played do not count) and plays a random feasible point of the last cell reached.
    fn exploit_in(
        &self,
        _ctx: &DeviceContext,
        region: &FeasibleRegion,
        rng: &mut ChaCha8Rng,
    ) -> Option<Arm> {
        let root = &self.nodes[0];
        if root.count == 0 || !self.cell_feasible(&root.cell, region) {
            return None;
        }
        let mut at = 0usize;
        loop {
            let node = &self.nodes[at];
            let mean = |j: u32| {
                let c = &self.nodes[j as usize];
                (c.count > 0 && self.cell_feasible(&c.cell, region))
                    .then(|| (j as usize, c.sum / c.count as f64))
            };
            match argmax_random_tie(node.children.iter().flatten().filter_map(|&j| mean(j)), rng) {
                Some(j) => at = j,
                None => return Some(self.sample_in(&node.cell, region, rng)),
            }
        }
    }
}
