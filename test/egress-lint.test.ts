import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ESLint } from 'eslint';

// Issue 7: outbound clients (http, https, net, tls, fetch, undici, …) only in src/egress. ESLint's
// Node API runs the project's eslint.config.js on synthetic files placed in src/, for each form a
// client can take; a listener stays allowed.
const eslint = new ESLint();

async function ruleIds(filePath: string, code: string): Promise<string[]> {
  const [result] = await eslint.lintText(code, { filePath });
  return (result?.messages ?? []).map((m) => m.ruleId ?? `fatal: ${m.message}`);
}

const OUTBOUND_RULES = new Set([
  'no-restricted-imports',
  'no-restricted-globals',
  'custos/no-outbound-client',
]);

const OFFENDERS: [string, string][] = [
  ['global fetch', "export const r = () => fetch('https://example.org');\n"],
  ['globalThis.fetch', "export const r = () => globalThis.fetch('https://example.org');\n"],
  ['http named request', "import { request } from 'node:http';\nexport const r = request;\n"],
  [
    'http default import .request',
    "import http from 'node:http';\nexport const r = () => http.request('http://example.org');\n",
  ],
  [
    'http default import .get',
    "import http from 'http';\nexport const r = () => http.get('http://example.org');\n",
  ],
  [
    'https namespace .request',
    "import * as https from 'node:https';\nexport const r = () => https.request('https://example.org');\n",
  ],
  ['https Agent', "import { Agent } from 'https';\nexport const a = new Agent();\n"],
  ['https globalAgent', "import https from 'node:https';\nexport const a = https.globalAgent;\n"],
  [
    'http2 connect',
    "import http2 from 'node:http2';\nexport const c = () => http2.connect('https://example.org');\n",
  ],
  [
    'net connect',
    "import { connect } from 'node:net';\nexport const c = () => connect(443, 'example.org');\n",
  ],
  [
    'net default .createConnection',
    "import net from 'net';\nexport const c = () => net.createConnection(443, 'example.org');\n",
  ],
  ['net Socket', "import * as net from 'node:net';\nexport const s = new net.Socket();\n"],
  [
    'tls connect',
    "import { connect } from 'node:tls';\nexport const c = () => connect(443, 'example.org');\n",
  ],
  [
    'tls default .connect',
    "import tls from 'tls';\nexport const c = () => tls.connect(443, 'example.org');\n",
  ],
  ['undici import', "import { request } from 'undici';\nexport const r = request;\n"],
  [
    'nodemailer import',
    "import nodemailer from 'nodemailer';\nexport const t = nodemailer.createTransport({ host: 'mail.example.org' });\n",
  ],
  [
    'nodemailer dynamic import',
    "export const r = async () => (await import('nodemailer')).createTransport({});\n",
  ],
  ['undici fetch', "import { fetch as f } from 'undici';\nexport const r = f;\n"],
  [
    'undici dynamic import',
    "export const r = async () => (await import('undici')).request('https://example.org');\n",
  ],
  [
    'https dynamic import',
    "export const r = async () => (await import('node:https')).get('https://example.org');\n",
  ],
  [
    'require https',
    "const https = require('node:https');\nexport const r = () => https.request('https://example.org');\n",
  ],
  ['require destructured', "const { request } = require('http');\nexport const r = request;\n"],
  [
    'destructured from default import',
    "import http from 'node:http';\nconst { get } = http;\nexport const r = get;\n",
  ],
  ['computed member', "import http from 'node:http';\nexport const r = http['request'];\n"],
];

for (const [name, code] of OFFENDERS) {
  test(`lint refuses an outbound client outside src/egress: ${name}`, async () => {
    const ids = await ruleIds('src/http/egress-lint-offender.ts', code);
    assert.ok(
      ids.some((id) => OUTBOUND_RULES.has(id)),
      `expected an outbound-client error, got ${JSON.stringify(ids)}`,
    );
  });
}

test('lint allows listeners and types outside src/egress', async () => {
  const listeners = [
    "import http from 'node:http';\nexport const s = http.createServer(() => {});\n",
    "import { createServer } from 'node:https';\nexport const s = createServer;\n",
    "import net from 'node:net';\nexport const s = net.createServer();\nexport const v = net.isIP('::1');\n",
    "import tls from 'node:tls';\nexport const s = tls.createServer({});\n",
    "import type { IncomingMessage } from 'node:http';\nexport type M = IncomingMessage;\n",
    "import http from 'node:http';\nexport type L = http.RequestListener;\n",
  ];
  for (const code of listeners)
    assert.deepEqual(await ruleIds('src/http/egress-lint-listener.ts', code), [], code);
});

test('the same clients are allowed inside src/egress', async () => {
  for (const [, code] of OFFENDERS) {
    const ids = await ruleIds('src/egress/egress-lint-allowed.ts', code);
    assert.ok(!ids.some((id) => OUTBOUND_RULES.has(id)), `${code}: ${JSON.stringify(ids)}`);
  }
});
