import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ESLint } from 'eslint';

// The architecture rules live in eslint.config.js and run in CI (`npm run lint`). These tests
// prove they bite: an offending file fails lint, the allowed place passes.
const eslint = new ESLint();

async function ruleIds(filePath: string, code: string): Promise<string[]> {
  const [result] = await eslint.lintText(code, { filePath });
  return (result?.messages ?? []).map((m) => m.ruleId ?? 'fatal');
}

test('only the PHI gateway may import the resource store', async () => {
  const code =
    "import { ResourceStore } from '../store/resource-store.ts';\nexport const s = ResourceStore;\n";
  assert.ok((await ruleIds('src/http/offender.ts', code)).includes('no-restricted-imports'));
  assert.ok((await ruleIds('src/cli/offender.ts', code)).includes('no-restricted-imports'));
  assert.deepEqual(await ruleIds('src/phi/allowed.ts', code), []);
});

test('outbound connections only through the egress port', async () => {
  assert.ok(
    (
      await ruleIds('src/http/offender.ts', "export const r = () => fetch('https://example.org');\n")
    ).includes('no-restricted-globals'),
  );
  assert.ok(
    (
      await ruleIds(
        'src/auth/offender.ts',
        "import { request } from 'node:https';\nexport const r = request;\n",
      )
    ).includes('no-restricted-imports'),
  );
  assert.deepEqual(
    await ruleIds(
      'src/http/listener.ts',
      "import { createServer } from 'node:http';\nexport const s = createServer;\n",
    ),
    [],
  );
  assert.deepEqual(
    await ruleIds('src/egress/allowed.ts', "export const r = () => fetch('https://example.org');\n"),
    [],
  );
});

test('server code logs only through the logger', async () => {
  assert.ok((await ruleIds('src/phi/offender.ts', "console.log('x');\n")).includes('no-console'));
});

test('only the PHI gateway (and the composition root) may use the crypto module', async () => {
  const code = "import { Envelope } from '../crypto/envelope.ts';\nexport const e = Envelope;\n";
  assert.ok((await ruleIds('src/http/offender.ts', code)).includes('no-restricted-imports'));
  assert.ok((await ruleIds('src/store/offender.ts', code)).includes('no-restricted-imports'));
  assert.ok((await ruleIds('src/audit/offender.ts', code)).includes('no-restricted-imports'));
  assert.deepEqual(await ruleIds('src/phi/allowed.ts', code), []);
});
