-- 高峰期（9-18点）更严格的限流
local hour = current_time.hour

if hour >= 9 and hour <= 18 then
  -- 高峰期：普通用户限流更严格
  if key_info.total_quota < 1000000 then
    if rate_limit_status.key_remaining < 10 then
      return {
        allow = false,
        reason = "高峰期限流，请稍后重试"
      }
    end
  end
end

-- 使用标准限流逻辑
return nil
