{{/*
Secrets: the cluster token and the Redis password. No secret value is ever written into a pod
spec: containers read them from Secrets (env valueFrom.secretKeyRef), and the Redis URL in the
args names the password as $(TANDEM_REDIS_PASSWORD), which the kubelet expands from the
container's env when it starts the process.

Generated Secrets (no existingSecret): secrets.yaml makes <fullname>-auth and, with the
embedded Redis, <fullname>-redis. On `helm install/upgrade` it looks the Secret up first and
keeps the value it finds, so upgrades do not rotate the token. Where lookup has no cluster
(`helm template`, `--dry-run=client`, Argo CD) it finds nothing and a new value is made at each
render: such tools must use existingSecret.
*/}}

{{- define "tandem.tokenEnv" -}}TANDEM_CLUSTER_TOKEN{{- end }}
{{- define "tandem.redisPasswordEnv" -}}TANDEM_REDIS_PASSWORD{{- end }}
{{- define "tandem.redisUrlEnv" -}}TANDEM_REDIS_URL{{- end }}

{{/* The Secret the chart generates for the token: "<fullname>-auth". */}}
{{- define "tandem.authSecretName" -}}
{{- include "tandem.componentName" (dict "root" . "component" "auth") }}
{{- end }}

{{/* The Secret the chart generates for the embedded Redis's password: "<fullname>-redis". */}}
{{- define "tandem.redisSecretName" -}}
{{- include "tandem.componentName" (dict "root" . "component" "redis") }}
{{- end }}

{{/* secretKeyRef of the cluster token: auth.existingSecret, or the chart's own Secret. */}}
{{- define "tandem.tokenRef" -}}
{{- if .Values.auth.existingSecret -}}
name: {{ .Values.auth.existingSecret }}
key: {{ .Values.auth.existingSecretKey }}
{{- else -}}
name: {{ include "tandem.authSecretName" . }}
key: token
{{- end }}
{{- end }}

{{/* True ("true") when the chart generates the Redis password (embedded Redis, no existingSecret). */}}
{{- define "tandem.redisPasswordGenerated" -}}
{{- if and .Values.redis.enabled (not .Values.redis.auth.existingSecret) }}true{{ end }}
{{- end }}

{{/* secretKeyRef of the Redis password; empty when there is none (external Redis without one). */}}
{{- define "tandem.redisPasswordRef" -}}
{{- if .Values.redis.auth.existingSecret -}}
name: {{ .Values.redis.auth.existingSecret }}
key: {{ .Values.redis.auth.existingSecretKey }}
{{- else if .Values.redis.enabled -}}
name: {{ include "tandem.redisSecretName" . }}
key: redis-password
{{- end }}
{{- end }}

{{/*
The Redis URL every Tandem component is given (--redis), exactly one of:
- embedded Redis: redis://:$(TANDEM_REDIS_PASSWORD)@<fullname>-redis.<namespace>.svc:6379/0;
- redis.externalUrl: as given, with :$(TANDEM_REDIS_PASSWORD)@ put in when redis.auth names a
  Secret (redis://, rediss:// and unix:// alike);
- redis.externalUrlSecret: $(TANDEM_REDIS_URL), the whole URL from the Secret.
*/}}
{{- define "tandem.redisUrl" -}}
{{- $redis := .Values.redis }}
{{- $password := printf "$(%s)" (include "tandem.redisPasswordEnv" .) }}
{{- if $redis.enabled }}
{{- if or $redis.externalUrl $redis.externalUrlSecret.name }}
{{- fail "redis.externalUrl or redis.externalUrlSecret.name is set while redis.enabled=true: set redis.enabled=false to use an external Redis" }}
{{- end }}
{{- printf "redis://:%s@%s.%s.svc:6379/0" $password (include "tandem.componentName" (dict "root" . "component" "redis")) .Release.Namespace }}
{{- else if and $redis.externalUrl $redis.externalUrlSecret.name }}
{{- fail "redis.externalUrl and redis.externalUrlSecret.name are both set: set one" }}
{{- else if $redis.externalUrlSecret.name }}
{{- if $redis.auth.existingSecret }}
{{- fail "redis.auth.existingSecret is set with redis.externalUrlSecret: the password goes inside the Secret's URL" }}
{{- end }}
{{- printf "$(%s)" (include "tandem.redisUrlEnv" .) }}
{{- else if $redis.externalUrl }}
{{- if contains "@" $redis.externalUrl }}
{{- fail "redis.externalUrl carries credentials, which would be visible in the pod spec: put the password in a Secret (redis.auth.existingSecret) or the whole URL in one (redis.externalUrlSecret)" }}
{{- end }}
{{- if $redis.auth.existingSecret }}
{{- $parts := splitn "://" 2 $redis.externalUrl }}
{{- printf "%s://:%s@%s" $parts._0 $password $parts._1 }}
{{- else }}
{{- $redis.externalUrl }}
{{- end }}
{{- else }}
{{- fail "redis.enabled=false needs redis.externalUrl or redis.externalUrlSecret.name" }}
{{- end }}
{{- end }}

{{/*
The secret env of every Tandem container (gateway, workers, autoscaler): the cluster token and
what the Redis URL refers to. Exec hooks and probes run with the same env, so the preStop
`tandem drain` has the token too.
*/}}
{{- define "tandem.secretEnv" -}}
- name: {{ include "tandem.tokenEnv" . }}
  valueFrom:
    secretKeyRef:
      {{- include "tandem.tokenRef" . | nindent 6 }}
{{- with include "tandem.redisPasswordRef" . }}
- name: {{ include "tandem.redisPasswordEnv" $ }}
  valueFrom:
    secretKeyRef:
      {{- . | nindent 6 }}
{{- end }}
{{- if and (not .Values.redis.enabled) .Values.redis.externalUrlSecret.name }}
- name: {{ include "tandem.redisUrlEnv" . }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.externalUrlSecret.name }}
      key: {{ .Values.redis.externalUrlSecret.key }}
{{- end }}
{{- end }}

{{/*
The base64 value of a generated Secret's key: the one already in the cluster (lookup), else
`length` random alphanumerics. Call with (dict "root" $ "name" NAME "key" KEY "length" 48).
*/}}
{{- define "tandem.generatedSecretValue" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .name }}
{{- $value := "" }}
{{- if $existing }}
{{- $value = index (default dict $existing.data) .key | default "" }}
{{- end }}
{{- if $value }}
{{- $value }}
{{- else }}
{{- randAlphaNum (int .length) | b64enc }}
{{- end }}
{{- end }}
