// The province's identity provider, for the console's OIDC sign-in tests: node-oidc-provider
// (an OpenID Certified OP, from npm), with its development interactions (any login name
// signs in as that subject; the password is not checked). Not a mock of an IdP: the real
// authorization, token, discovery and JWKS endpoints the console talks to.
//
//   node idp.mjs PORT CLIENT_ID CLIENT_SECRET REDIRECT_URI
//
// Prints one line `listening http://127.0.0.1:PORT` once it accepts connections.
import { Provider } from "oidc-provider";

const [port, clientId, clientSecret, redirectUri] = process.argv.slice(2);
if (!redirectUri) {
  console.error("usage: node idp.mjs PORT CLIENT_ID CLIENT_SECRET REDIRECT_URI");
  process.exit(2);
}
const issuer = `http://127.0.0.1:${port}`;
const provider = new Provider(issuer, {
  clients: [
    {
      client_id: clientId,
      client_secret: clientSecret,
      redirect_uris: [redirectUri],
      response_types: ["code"],
      grant_types: ["authorization_code"],
      token_endpoint_auth_method: "client_secret_basic",
    },
  ],
  pkce: { required: () => true },
  features: { devInteractions: { enabled: true } },
  async findAccount(ctx, sub) {
    return { accountId: sub, async claims() { return { sub }; } };
  },
});
provider.listen(Number(port), "127.0.0.1", () => {
  console.log(`listening ${issuer}`);
});
