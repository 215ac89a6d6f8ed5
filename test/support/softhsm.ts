import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { required } from './storage.ts';

/**
 * SoftHSMv2 (Debian package softhsm2) for the PKCS#11 key provider tests: a private token
 * directory and SOFTHSM2_CONF under a temp dir, tokens made with `softhsm2-util --init-token`.
 * Without softhsm2 the tests skip, saying so; CUSTOS_TEST_REQUIRE=softhsm (as .ci/run sets) makes
 * that a failure.
 *
 * SoftHSM reads SOFTHSM2_CONF when the module is initialised, once per process, so each test
 * process gets one config (set here, before any provider loads the module) and its tokens live
 * in that one directory.
 */
export const SOFTHSM_MODULE_CANDIDATES = [
  '/usr/lib/softhsm/libsofthsm2.so',
  '/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so',
  '/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so',
  '/usr/local/lib/softhsm/libsofthsm2.so',
];

function findModule(): string | undefined {
  return SOFTHSM_MODULE_CANDIDATES.find((p) => fs.existsSync(p));
}

function findUtil(): string | undefined {
  for (const dir of (process.env.PATH ?? '/usr/bin:/bin').split(':').concat(['/usr/bin', '/usr/local/bin'])) {
    const p = path.join(dir, 'softhsm2-util');
    if (dir && fs.existsSync(p)) return p;
  }
  return undefined;
}

/** For node:test's `skip`: false when SoftHSMv2 is installed, else why not (a failure when required). */
export function needsSoftHsm(): false | string {
  const missing = !findModule()
    ? 'libsofthsm2.so not found'
    : !findUtil()
      ? 'softhsm2-util not found'
      : undefined;
  if (!missing) return false;
  if (required.has('softhsm')) {
    throw new Error(`CUSTOS_TEST_REQUIRE includes softhsm, but ${missing} (apt-get install softhsm2)`);
  }
  return `SoftHSMv2 not installed (${missing}): apt-get install softhsm2 to run this test`;
}

export interface SoftHsmToken {
  module: string;
  label: string;
  pin: string;
  soPin: string;
}

let root: string | undefined;

function setUp(): string {
  if (root) return root;
  root = fs.mkdtempSync(path.join(os.tmpdir(), 'custos-softhsm-'));
  fs.mkdirSync(path.join(root, 'tokens'), { mode: 0o700 });
  const conf = path.join(root, 'softhsm2.conf');
  fs.writeFileSync(
    conf,
    [
      `directories.tokendir = ${path.join(root, 'tokens')}`,
      'objectstore.backend = file',
      'log.level = ERROR',
      'slots.removable = false',
      '',
    ].join('\n'),
    { mode: 0o600 },
  );
  process.env.SOFTHSM2_CONF = conf;
  return root;
}

/**
 * Initialises a fresh token in this process's private SoftHSM directory. Make every token a
 * test file needs before the first provider opens the module: SoftHSM lists slots at C_Initialize.
 */
export function createSoftHsmToken(label = `custos-${randomBytes(4).toString('hex')}`): SoftHsmToken {
  const module = findModule();
  const util = findUtil();
  if (!module || !util) throw new Error('SoftHSMv2 is not installed');
  setUp();
  const token: SoftHsmToken = {
    module,
    label,
    pin: randomBytes(6).toString('hex'),
    soPin: randomBytes(6).toString('hex'),
  };
  execFileSync(
    util,
    ['--init-token', '--free', '--label', label, '--so-pin', token.soPin, '--pin', token.pin],
    { env: { ...process.env }, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  return token;
}

/** Removes this process's SoftHSM directory (after every provider on it is closed). */
export function removeSoftHsm(): void {
  if (root) fs.rmSync(root, { recursive: true, force: true });
  root = undefined;
}
