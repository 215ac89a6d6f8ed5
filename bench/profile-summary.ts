/**
 * Summarizes a V8 .cpuprofile (from `node --cpu-prof`): where the samples' self time went, by
 * function, by source file and by package, optionally within a time window.
 *
 *   node --import tsx bench/profile-summary.ts <file.cpuprofile> [--from <µs>] [--to <µs>] [--top 20] [--json]
 *
 * `--from`/`--to` are timestamps on the profile's clock (CLOCK_MONOTONIC in microseconds, which is
 * also `process.hrtime.bigint() / 1000n` in any process on the machine): bench/http-bench.ts uses
 * them to cut one profile of the server into its create and read phases.
 *
 * "Self time" of a frame is the time of the samples in which it was on top of the stack; the
 * pseudo-frames "(idle)" (waiting for I/O), "(program)" (V8/native outside JS) and
 * "(garbage collector)" are kept as their own rows. Packages: `node_modules/<pkg>` (scoped names
 * kept), `custos:<path>` for this repository's files, `node:<module>` for Node's own JavaScript,
 * `wasm` for WebAssembly (PGlite's PostgreSQL); a native builtin without a script (fs and crypto
 * bindings, …) is attributed to its nearest caller's package as `<package> (native)`.
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

interface CallFrame {
  functionName: string;
  url: string;
  lineNumber: number;
  columnNumber: number;
}
interface ProfileNode {
  id: number;
  callFrame: CallFrame;
  children?: number[];
}
export interface CpuProfile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples: number[];
  timeDeltas: number[];
}

export interface Row {
  name: string;
  ms: number;
  /** Percent of the busy (non-idle) time in the window. */
  pct: number;
}

export interface ProfileSummary {
  windowMs: number;
  busyMs: number;
  idleMs: number;
  /** busy ÷ window: the share of one core the process used. */
  cpuUtilisation: number;
  samples: number;
  byFunction: Row[];
  byFile: Row[];
  byPackage: Row[];
  /** Time with at least one frame of the package on the stack (inclusive; sums exceed 100%). */
  inclusiveByPackage: Row[];
}

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

function fileOf(url: string): string {
  if (!url) return '';
  if (url.startsWith('file://')) {
    try {
      return fileURLToPath(url);
    } catch {
      return url;
    }
  }
  return url;
}

/** The package a frame belongs to. */
export function packageOf(frame: CallFrame): string {
  const { url, functionName } = frame;
  if (!url) return functionName.startsWith('(') ? functionName : 'native';
  if (url.startsWith('wasm://')) return 'wasm';
  if (url.startsWith('node:'))
    return `node:${
      url
        .slice(5)
        .replace(/^internal\//, '')
        .split('/')[0]
    }`;
  const file = fileOf(url);
  const nm = file.lastIndexOf('/node_modules/');
  if (nm >= 0) {
    const rest = file.slice(nm + '/node_modules/'.length).split('/');
    return rest[0]!.startsWith('@') ? `${rest[0]}/${rest[1]}` : rest[0]!;
  }
  if (file.startsWith(repoRoot + path.sep)) {
    const rel = path.relative(repoRoot, file).split(path.sep);
    return `custos:${rel.slice(0, Math.min(2, rel.length - 1)).join('/') || rel[0]}`;
  }
  return file;
}

function shortFile(url: string): string {
  if (!url) return '';
  if (url.startsWith('node:') || url.startsWith('wasm://')) return url;
  const file = fileOf(url);
  const nm = file.lastIndexOf('/node_modules/');
  if (nm >= 0) return file.slice(nm + 1);
  return file.startsWith(repoRoot + path.sep) ? path.relative(repoRoot, file) : file;
}

function fnLabel(frame: CallFrame): string {
  const name = frame.functionName || '(anonymous)';
  if (!frame.url) return name;
  // Line 1 of a bundled or transformed (tsx) file says nothing: show the file only.
  return frame.lineNumber > 0
    ? `${name} ${shortFile(frame.url)}:${frame.lineNumber + 1}`
    : `${name} ${shortFile(frame.url)}`;
}

function top(map: Map<string, number>, n: number, busyUs: number): Row[] {
  return [...map.entries()]
    .sort((a, b) => b[1] - a[1])
    .slice(0, n)
    .map(([name, us]) => ({
      name,
      ms: Math.round(us / 100) / 10,
      pct: busyUs > 0 ? Math.round((us / busyUs) * 1000) / 10 : 0,
    }));
}

export function summarizeProfile(
  profile: CpuProfile,
  opts: { from?: number; to?: number; top?: number } = {},
): ProfileSummary {
  const n = opts.top ?? 20;
  const byId = new Map<number, ProfileNode>();
  const parent = new Map<number, number>();
  for (const node of profile.nodes) {
    byId.set(node.id, node);
    for (const c of node.children ?? []) parent.set(c, node.id);
  }
  // Native frames (fs bindings, crypto, …) have no script: attribute them to the nearest caller that has one.
  const callerPkg = new Map<number, string>();
  const nearestPkg = (id: number): string => {
    const cached = callerPkg.get(id);
    if (cached !== undefined) return cached;
    const node = byId.get(id);
    const p = parent.get(id);
    const v = node?.callFrame.url ? packageOf(node.callFrame) : p === undefined ? 'native' : nearestPkg(p);
    callerPkg.set(id, v);
    return v;
  };
  // Packages on each node's stack (memoized per node).
  const stackPkgs = new Map<number, Set<string>>();
  const pkgsOf = (id: number): Set<string> => {
    let s = stackPkgs.get(id);
    if (s) return s;
    const p = parent.get(id);
    s = new Set(p === undefined ? [] : pkgsOf(p));
    const node = byId.get(id);
    if (node && node.callFrame.url) s.add(packageOf(node.callFrame));
    stackPkgs.set(id, s);
    return s;
  };
  const from = opts.from ?? -Infinity;
  const to = opts.to ?? Infinity;
  const fn = new Map<string, number>();
  const file = new Map<string, number>();
  const pkg = new Map<string, number>();
  const incl = new Map<string, number>();
  let t = profile.startTime;
  let windowUs = 0;
  let idleUs = 0;
  let samples = 0;
  const add = (m: Map<string, number>, k: string, us: number) => m.set(k, (m.get(k) ?? 0) + us);
  for (let i = 0; i < profile.samples.length; i++) {
    t += profile.timeDeltas[i] ?? 0;
    // A sample stands for the interval until the next one.
    const us = profile.timeDeltas[i + 1] ?? 0;
    if (t < from || t > to) continue;
    const node = byId.get(profile.samples[i]!);
    if (!node) continue;
    samples++;
    windowUs += us;
    const frame = node.callFrame;
    if (frame.functionName === '(idle)') {
      idleUs += us;
      continue;
    }
    const native = !frame.url && !frame.functionName.startsWith('(');
    const caller = native ? nearestPkg(node.id) : '';
    add(fn, native ? `${frame.functionName || '(anonymous)'} [native, from ${caller}]` : fnLabel(frame), us);
    add(
      file,
      frame.url ? shortFile(frame.url) : native ? `[native, from ${caller}]` : frame.functionName,
      us,
    );
    add(pkg, native ? `${caller} (native)` : packageOf(frame), us);
    for (const p of pkgsOf(node.id)) add(incl, p, us);
  }
  const busyUs = windowUs - idleUs;
  return {
    windowMs: Math.round(windowUs / 1000),
    busyMs: Math.round(busyUs / 1000),
    idleMs: Math.round(idleUs / 1000),
    cpuUtilisation: windowUs > 0 ? Math.round((busyUs / windowUs) * 100) / 100 : 0,
    samples,
    byFunction: top(fn, n, busyUs),
    byFile: top(file, n, busyUs),
    byPackage: top(pkg, n, busyUs),
    inclusiveByPackage: top(incl, n, busyUs),
  };
}

export function readProfile(file: string): CpuProfile {
  return JSON.parse(fs.readFileSync(file, 'utf8')) as CpuProfile;
}

function printTable(title: string, rows: Row[]): void {
  console.log(`\n${title}`);
  for (const r of rows)
    console.log(`  ${r.pct.toFixed(1).padStart(5)}%  ${r.ms.toFixed(1).padStart(9)} ms  ${r.name}`);
}

const isMain = process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url);
if (isMain) {
  const args = process.argv.slice(2);
  const flag = (name: string) => {
    const i = args.indexOf(name);
    return i >= 0 ? args[i + 1] : undefined;
  };
  const file = args.find(
    (a, i) => !a.startsWith('--') && !(i > 0 && ['--from', '--to', '--top'].includes(args[i - 1]!)),
  );
  if (!file) {
    console.error(
      'usage: node --import tsx bench/profile-summary.ts <file.cpuprofile> [--from µs] [--to µs] [--top 20] [--json]',
    );
    process.exit(2);
  }
  const from = flag('--from');
  const to = flag('--to');
  const s = summarizeProfile(readProfile(file), {
    from: from === undefined ? undefined : Number(from),
    to: to === undefined ? undefined : Number(to),
    top: Number(flag('--top') ?? 20),
  });
  if (args.includes('--json')) {
    console.log(JSON.stringify(s, null, 2));
  } else {
    console.log(
      `window ${s.windowMs} ms, busy ${s.busyMs} ms (${Math.round(s.cpuUtilisation * 100)}% of one core), ${s.samples} samples`,
    );
    printTable('top self time by package', s.byPackage);
    printTable('top self time by file', s.byFile);
    printTable('top self time by function', s.byFunction);
    printTable('inclusive time by package (on the stack)', s.inclusiveByPackage);
  }
}
