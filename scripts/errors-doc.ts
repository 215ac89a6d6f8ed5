// Regenerates docs/errors.md from the error catalog: `node --import tsx scripts/errors-doc.ts`.
// test/errors-doc.test.ts fails when the two drift apart.
import fs from 'node:fs';
import { ERROR_CATALOG } from '../src/kernel/errors.ts';

export function renderErrorsDoc(): string {
  const rows = Object.entries(ERROR_CATALOG).map(
    ([code, e]) => `| \`${code}\` | ${e.status} | \`${e.issue}\` | ${e.ack} | ${e.message} |`,
  );
  return `# Error codes

Every error Custos returns is an OperationOutcome whose \`issue[].details.coding\` carries one of these
codes (system \`urn:custos:error\`). Code branches on the code, never on the text. The text is fixed
by us and never contains data from the request. Unknown errors become \`INTERNAL\` with a correlation
id (the \`X-Request-Id\` of the response) and none of their original text. The HL7 v2 column is the
ACK code used when the error arises on an MLLP interface.

Generated from \`src/kernel/errors.ts\` by \`scripts/errors-doc.ts\`.

| code | HTTP | FHIR issue type | HL7 v2 ACK | meaning |
|---|---|---|---|---|
${rows.join('\n')}
`;
}

if (process.argv[1]?.endsWith('errors-doc.ts')) fs.writeFileSync('docs/errors.md', renderErrorsDoc());
