import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { renderErrorsDoc } from '../scripts/errors-doc.ts';

test('docs/errors.md is in step with the error catalog (regenerate: node --import tsx scripts/errors-doc.ts)', () => {
  assert.equal(fs.readFileSync(new URL('../docs/errors.md', import.meta.url), 'utf8'), renderErrorsDoc());
});
